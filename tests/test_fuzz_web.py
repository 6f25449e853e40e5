"""The web server's reader of outside data, its requests, under Hypothesis. Any request
line and headers, sent over a socket to a real server (one per module), get a valid HTTP
answer with the Content Security Policy and nosniff, within a bound on time; the answer
is 200 exactly when the request is a GET or HEAD of one of the site's names, addressed to
this server (one Host header naming it, or an absolute target naming it); and the
server's request threads never raise."""

import http.client
import re
import socket
import sys
import threading
import time

import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from convmixer_tf.web import CSP, Site
from convmixer_tf.web.serving import server

NAMES = ("index.html", "model.tflite", "config.json", "mediapipe/vision_bundle.mjs")
ANSWER_S = 5  # the bound on one exchange: the server answers a complete request at once
FAST = settings(
    max_examples=300,
    deadline=None,  # the bound is ANSWER_S, checked on each exchange
    database=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture],
)


@pytest.fixture(scope="module")
def site_server(tmp_path_factory):
    """A server of a small site (model.tflite a file on disk, the others bytes) on
    127.0.0.1, in threads of this process: (port, the exceptions its threads raised)."""
    model = tmp_path_factory.mktemp("site") / "model.tflite"
    model.write_bytes(b"TFL3" + bytes(range(256)) * 40)
    files = {name: f"<{name}>".encode() for name in NAMES}
    httpd = server(Site({**files, "model.tflite": str(model)}), "127.0.0.1", 0)
    raised = []
    httpd.handle_error = lambda request, address: raised.append(sys.exc_info()[1])
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    yield httpd.server_address[1], raised
    httpd.shutdown()
    httpd.server_close()


TOKEN = st.from_regex(r"\A[!#$%&'*+\-.^_`|~0-9A-Za-z]{1,12}\Z")
TEXT = st.binary(max_size=200).map(lambda b: b.replace(b"\r", b"").replace(b"\n", b""))
WORD = TEXT.map(lambda b: b.replace(b" ", b""))
METHODS = st.one_of(st.sampled_from(["GET", "HEAD", "POST", "PUT", "OPTIONS", "get"]), TOKEN)
VERSIONS = st.sampled_from(
    ["HTTP/1.1", "HTTP/1.0", "HTTP/0.9", "", "HTTP/2.0", "HTTP/1.x", "http/1.1"]
)
PREFIXES = ["/", "//", "http://{here}/", "HTTP://{here}/", "http://evil.example/", "", "*"]
TARGETS = st.one_of(
    st.tuples(
        st.sampled_from(PREFIXES + ["/mediapipe/../", "https://{here}/", "/%2e%2e/"]),
        st.sampled_from([*NAMES, "", "setup.cfg", "mediapipe", "model.TFLITE"]),
        st.sampled_from(["", "?x=1", "#f", "?a#b", "%00", "/", ".."]),
    ).map(lambda parts: "".join(parts).encode()),
    WORD.map(lambda b: b"/" + b),
    WORD,
)
HOSTS = st.one_of(
    st.sampled_from(
        ["{here}", "localhost:{port}", "LOCALHOST:{port}", "evil.example", "evil.example:{port}"]
        + ["127.0.0.1", "[::1]:{port}", "", "127.0.0.1:{port}0", "127.0.0.1:{port}:1"]
    ).map(str.encode),
    TEXT,
)
HEADERS = st.lists(
    st.tuples(st.one_of(TOKEN, st.sampled_from(["Host", "hOsT"])).map(str.encode), TEXT),
    max_size=8,
)


@st.composite
def requests(draw) -> dict:
    method, target, version = draw(METHODS), draw(TARGETS), draw(VERSIONS)
    headers = [(b"Host", host) for host in draw(st.lists(HOSTS, max_size=2))]
    headers += draw(HEADERS)
    return {"method": method, "target": target, "version": version, "headers": headers}


def rendered(request: dict, port: int) -> bytes:
    here = f"127.0.0.1:{port}".encode()
    words = [request["method"].encode(), request["target"], request["version"].encode()]
    lines = [b" ".join(word for word in words if word)]
    lines += [name + b": " + value for name, value in request["headers"]]
    raw = b"\r\n".join([*lines, b"", b""])
    return raw.replace(b"{here}", here).replace(b"{port}", str(port).encode())


def proper(raw: bytes, port: int) -> bool:
    """Whether `raw` is a GET or HEAD of one of the site's names, addressed to the server
    at 127.0.0.1:`port`, as HTTP/1.0 and HTTP/1.1 define it (a request of HTTP/0.9, named
    or a GET line of two words, is answered as HTTP/1.0)."""
    lines = raw.decode("latin-1").split("\r\n")
    words = lines[0].split()
    if words[:1] == ["GET"] and len(words) == 2:  # HTTP/0.9's simple request, GET alone
        words.append("HTTP/0.9")
    if (
        len(words) != 3
        or words[0] not in ("GET", "HEAD")
        or words[2] not in ("HTTP/0.9", "HTTP/1.0", "HTTP/1.1")
    ):
        return False
    hosts = [
        line.split(":", 1)[1].lstrip(" \t")
        for line in lines[1:]
        if line.lower().startswith("host:")
    ]
    here = f"127.0.0.1:{port}"
    target = words[1]
    absolute = re.match(r"(?i)http://([^/?#]*)(.*)", target)
    if absolute:
        authority, target = absolute.group(1), "/" + absolute.group(2).lstrip("/")
    else:
        authority = hosts[0] if hosts else None
    if len(hosts) != 1 or authority not in (here, f"localhost:{port}", f"LOCALHOST:{port}"):
        return False
    path = re.split(r"[?#]", target, maxsplit=1)[0]
    return path.startswith("/") and (path.lstrip("/") or "index.html") in NAMES


def answer(raw: bytes, port: int):
    """(status, headers) of the answer to `raw`, read to its end; None where the server
    closed the connection without an answer. Raises where the answer is not valid HTTP
    or does not come within ANSWER_S."""
    method = raw.split(b" ", 1)[0].decode("latin-1")
    with socket.create_connection(("127.0.0.1", port), timeout=ANSWER_S) as connection:
        connection.sendall(raw)
        connection.shutdown(socket.SHUT_WR)  # nothing more comes
        response = http.client.HTTPResponse(connection, method=method)
        try:
            response.begin()
        except http.client.RemoteDisconnected:
            return None
        body = response.read()
    length = response.headers["Content-Length"]
    assert length is None or int(length) == len(body) or method == "HEAD"
    return response.status, response.headers


def check(request: dict, port: int, raised: list) -> None:
    raw = rendered(request, port)
    started = time.monotonic()
    got = answer(raw, port)
    assert time.monotonic() - started < ANSWER_S
    assert raised == []
    if got is None:  # only for a request line with no words
        assert not raw.split(b"\r\n", 1)[0].split(), raw
        return
    status, headers = got
    assert headers.get_all("Content-Security-Policy") == [CSP], raw
    assert headers.get_all("X-Content-Type-Options") == ["nosniff"], raw
    assert (status == 200) == proper(raw, port), (status, raw)


SIMPLE_GET = {
    "method": "GET",
    "target": b"/index.html",
    "version": "",
    "headers": [(b"Host", b"{here}")],
}


@FAST
@given(request=requests())
@example(request=SIMPLE_GET)  # HTTP/0.9's form, with the Host served: the page
def test_any_request_gets_a_valid_answer_and_only_the_sites_names_are_200(site_server, request):
    check(request, *site_server)


@pytest.mark.slow
@settings(FAST, max_examples=5000)
@given(request=requests())
def test_any_request_gets_a_valid_answer_and_only_the_sites_names_are_200_many(
    site_server, request
):
    check(request, *site_server)
