"""The web command against hostile requests and arguments, one row each: the served page
answers only requests addressed to it (DNS rebinding: another site's name rebound to this
machine reads nothing), every answer carries the Content Security Policy and nosniff,
errors included, and only the site's names are ever 200. Requests go over a socket to the
command itself, serving as a user runs it; bad hosts and ports give their own advice."""

import contextlib
import errno
import http.client
import json
import os
import shutil
import signal
import socket
import socketserver
import subprocess
import sys
import threading
import time
import urllib.parse

import pytest
from conftest import run_with_stdio

from convmixer_tf.web import CSP, Site
from convmixer_tf.web.__main__ import main
from convmixer_tf.web.serving import _Handler, server


@contextlib.contextmanager
def serving(*args):
    """The web command serving (a real process) on a free port: (host, port) of the address
    it printed."""
    command = [sys.executable, "-m", "convmixer_tf.web", "--port", "0", *args]
    with subprocess.Popen(command, stdout=subprocess.PIPE, text=True) as process:
        try:
            address = urllib.parse.urlsplit(process.stdout.readline().strip())
            assert (address.scheme, address.path) == ("http", "/"), address
            yield address.hostname, address.port
        finally:
            process.send_signal(signal.SIGINT)


def exchange(raw: bytes, port: int, address: str = "127.0.0.1"):
    """Sends `raw` and reads the answer to the end: (status, headers, body); None where the
    server closed the connection without answering. An answer that is not valid HTTP
    (an HTTP/0.9 one, without a status line or headers) raises."""
    with socket.create_connection((address, port), timeout=10) as connection:
        connection.sendall(raw)
        response = http.client.HTTPResponse(connection, method=raw.split(b" ", 1)[0].decode())
        try:
            response.begin()
        except http.client.RemoteDisconnected:
            return None
        return response.status, response.headers, response.read()


@pytest.fixture(scope="module")
def port(exported):
    with serving("--model", str(exported / "model_int8.tflite")) as (host, port):
        assert host == "127.0.0.1"
        yield port


def request(target="/", host="{here}", method="GET", version="HTTP/1.1", headers=()):
    lines = [f"{method} {target} {version}".rstrip(), *([f"Host: {host}"] if host else [])]
    return "\r\n".join([*lines, *headers, "", ""])


def fill(raw: str, port: int) -> str:
    """`raw` with {here} the server's 127.0.0.1:PORT, {port} its port, {other} another."""
    raw = raw.replace("{here}", f"127.0.0.1:{port}").replace("{port}", str(port))
    return raw.replace("{other}", str(port % 65535 + 1))


ROWS = [
    # Host: only the address served answers; anything else is 421, none or two is 400
    ("host served", request(), 200),
    ("host localhost", request(host="localhost:{port}"), 200),
    ("host LOCALHOST", request(host="LocalHost:{port}"), 200),
    ("host evil.example", request(host="evil.example"), 421),
    ("host evil.example:port", request(host="evil.example:{port}"), 421),
    ("host rebinding name", request(host="127.0.0.1.nip.io:{port}"), 421),
    ("host another port", request(host="127.0.0.1:{other}"), 421),
    ("host no port", request(host="127.0.0.1"), 421),
    ("host empty", "GET / HTTP/1.1\r\nHost: \r\n\r\n", 421),
    ("host decimal address", request(host="2130706433:{port}"), 421),
    ("host trailing dot", request(host="localhost.:{port}"), 421),
    ("host bad port", request(host="127.0.0.1:{port}x"), 421),
    ("host with spaces around", "GET / HTTP/1.1\r\nHost: \t{here} \r\n\r\n", 200),
    ("host ipv6 literal", request(host="[::1]:{port}"), 421),  # the connection reached 127.0.0.1
    ("host bracketed ipv4", request(host="[127.0.0.1]:{port}"), 421),
    ("host missing", request(host=None), 400),
    ("host twice", request(headers=["Host: {here}"]), 400),
    ("host twice, one evil", request(headers=["Host: evil.example"]), 400),
    ("host evil on POST", request(method="POST", host="evil.example"), 421),
    # paths: the site's names and nothing else
    ("path /", request("/"), 200),
    ("path model", request("/model.tflite"), 200),
    ("path mediapipe", request("/mediapipe/vision_bundle.mjs"), 200),
    ("path query", request("/index.html?x=1#y"), 200),
    ("path double slash", request("//model.tflite"), 200),
    ("path ..", request("/../setup.cfg"), 404),
    ("path %2e%2e", request("/%2e%2e/%2e%2e/etc/passwd"), 404),
    ("path .. inside", request("/mediapipe/../model.tflite"), 404),
    ("path folder", request("/mediapipe/"), 404),
    ("path encoded name", request("/model%2Etflite"), 404),
    ("path NUL", request("/model.tflite\x00.png"), 404),
    ("path %00", request("/model.tflite%00"), 404),
    ("path non-ASCII", request("/modèle.tflite"), 404),
    ("path long", request("/" + "a" * 60000), 404),
    ("path too long", request("/" + "a" * 70000), 414),
    ("absolute URL here", request("http://{here}/model.tflite", host="evil.example"), 200),
    ("absolute URL elsewhere", request("http://evil.example/model.tflite"), 421),
    ("absolute URL https", request("https://{here}/model.tflite"), 400),
    ("target without /", request("model.tflite"), 400),
    ("target *", request("*"), 400),
    # methods: GET and HEAD only
    ("HEAD", request(method="HEAD"), 200),
    ("POST", request(method="POST"), 501),
    ("PUT", request("/model.tflite", method="PUT"), 501),
    ("OPTIONS", request(method="OPTIONS"), 501),
    ("DELETE", request(method="DELETE"), 501),
    ("lower-case get", request(method="get"), 501),
    ("garbage method", request(method="G@R\x7fBAGE"), 501),
    # header floods
    ("101 headers", request(headers=[f"X-{i}: {i}" for i in range(101)]), 431),
    ("a 70 kB header", request(headers=["X-Long: " + "a" * 70000]), 431),
    ("99 headers", request(headers=[f"X-{i}: {i}" for i in range(98)]), 200),
    # protocol versions
    ("HTTP/0.9", "GET /\r\n\r\n", 400),
    # HTTP/0.9 named on the request line: http.server would answer with no status line and
    # no headers at all, an error as much as a page
    ("HTTP/0.9 named", request(version="HTTP/0.9"), 200),
    ("HTTP/0.9 named, HEAD", request(method="HEAD", version="HTTP/0.9"), 200),
    ("HTTP/0.9 named, not found", request("/setup.cfg", version="HTTP/0.9"), 404),
    ("HTTP/0.9 named, evil host", request(host="evil.example", version="HTTP/0.9"), 421),
    ("HTTP/0.9 named, no host", request(host=None, version="HTTP/0.9"), 400),
    ("HTTP/0.9 named, POST", request(method="POST", version="HTTP/0.9"), 501),
    (
        "HTTP/0.9 named, 101 headers",
        request(version="HTTP/0.9", headers=[f"X-{i}: {i}" for i in range(101)]),
        431,
    ),
    ("HTTP/0.9 POST", "POST /\r\n\r\n", 400),
    ("HTTP/1.0 without Host", request(host=None, version="HTTP/1.0"), 400),
    ("HTTP/1.0 with Host", request(version="HTTP/1.0"), 200),
    ("HTTP/2.0", request(version="HTTP/2.0"), 505),
    ("HTTP/1.1.1", request(version="HTTP/1.1.1"), 400),
    ("FOO/1.1", request(version="FOO/1.1"), 400),
    ("four words", request(version="HTTP/1.1 x"), 400),
    ("no request line", "\r\n\r\n", None),
]


@pytest.mark.parametrize("raw, status", [row[1:] for row in ROWS], ids=[row[0] for row in ROWS])
def test_every_request_gets_its_status_and_the_promised_headers(port, raw, status):
    raw = fill(raw, port)
    answer = exchange(raw.encode("latin-1"), port)
    if status is None:  # an empty request line: the server just closes
        assert answer is None
        return
    got, headers, body = answer
    assert got == status, (got, headers, body[:200])
    assert headers.get_all("Content-Security-Policy") == [CSP]
    assert headers.get_all("X-Content-Type-Options") == ["nosniff"]
    if raw.startswith("HEAD"):
        assert body == b""


def test_the_page_comes_whole_and_only_under_its_own_names(port):
    status, headers, body = exchange(fill(request("/config.json"), port).encode(), port)
    assert status == 200 and b'"written_by": "convmixer_tf.web"' in body
    assert int(headers["Content-Length"]) == len(body)


@pytest.mark.parametrize(
    "args, message",
    [
        (["--output", ""], "argument --output: must not be empty"),
        (["--host", ""], "argument --host: must not be empty"),
        (["--mediapipe", ""], "argument --mediapipe: must not be empty"),
        (
            ["--host", "no-such-host.invalid"],
            "--host no-such-host.invalid: not an address, nor a name",
        ),
        (["--host", "[::1]"], "--host [::1]: not an address, nor a name"),
        (["--host", "192.0.2.1"], "192.0.2.1 is not an address of this machine"),
        (["--host", "a" * 64 + ".example"], "not an address, nor a name"),
        (["--port", "\u0663"], "must be a port number"),  # ARABIC-INDIC DIGIT THREE
    ],
    ids=[
        "--output empty",
        "--host empty",
        "--mediapipe empty",
        "unknown name",
        "brackets",
        "not here",
        "label too long",
        "non-ASCII digit",
    ],
)
def test_bad_arguments_are_exit_2_with_their_own_advice(exported, args, message):
    command = [sys.executable, "-m", "convmixer_tf.web", "--port", "0"]
    command += ["--model", str(exported / "model.tflite"), *args]
    done = subprocess.run(command, capture_output=True, text=True, timeout=60)
    assert done.returncode == 2, done
    assert message in done.stderr and done.stderr.count("\n") == 1, done.stderr
    assert "another --port" not in done.stderr  # the advice follows the error


def test_a_port_in_use_says_so(exported, capsys):
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        taken = str(busy.getsockname()[1])
        assert main(["--model", str(exported / "model.tflite"), "--port", taken]) == 2
    err = capsys.readouterr().err
    assert f"cannot serve on 127.0.0.1:{taken}: the port is in use; pass another --port" in err


def test_a_privileged_port_says_so(exported, capsys, monkeypatch):
    """As root here, binding port 80 succeeds; an unprivileged user gets EACCES from bind(2),
    given here by the socket layer's bind."""

    def refused(self):
        raise PermissionError(errno.EACCES, "Permission denied")

    monkeypatch.setattr(socketserver.TCPServer, "server_bind", refused)
    assert main(["--model", str(exported / "model.tflite"), "--port", "80"]) == 2
    err = capsys.readouterr().err
    assert "ports below 1024 need privileges; pass --port 1024 or above" in err
    assert "another --port" not in err


@pytest.mark.parametrize(
    "host, printed, reachable",
    [
        ("::1", "::1", [("::1", "[::1]")]),
        ("::", "::1", [("::1", "[::1]"), ("127.0.0.1", "127.0.0.1"), ("::1", "localhost")]),
        ("0.0.0.0", "127.0.0.1", [("127.0.0.1", "127.0.0.1"), ("127.0.0.1", "localhost")]),
        ("localhost", "127.0.0.1", [("127.0.0.1", "localhost"), ("127.0.0.1", "127.0.0.1")]),
        ("::ffff:127.0.0.1", "::ffff:127.0.0.1", [("::ffff:127.0.0.1", "[::ffff:7f00:1]")]),
    ],
)
def test_every_family_serves_and_answers_its_own_addresses_only(exported, host, printed, reachable):
    """IPv6 and IPv4, one interface or all: the command prints an address that works, and
    answers each address it is reached on (with localhost on the loopback); another name,
    rebound to the same address, is 421."""
    with serving("--model", str(exported / "model_int8.tflite"), "--host", host) as served:
        assert served[0] == printed
        port = served[1]
        for address, name in reachable:
            for host_header, status in ((f"{name}:{port}", 200), (f"evil.example:{port}", 421)):
                raw = request("/model.tflite", host=host_header).encode()
                got, headers, _ = exchange(raw, port, address)
                assert (got, headers["X-Content-Type-Options"]) == (status, "nosniff"), (
                    address,
                    host_header,
                )


def test_a_client_that_stops_sending_is_dropped_and_holds_no_one_up(monkeypatch):
    """Slowloris: connections that send half a request each hold a thread until the
    handler's timeout (30 s; 1 s here), while other clients are answered meanwhile."""
    assert _Handler.timeout == 30  # none at all would hold a thread for good
    monkeypatch.setattr(_Handler, "timeout", 1)
    httpd = server(Site({"index.html": b"page"}), "127.0.0.1", 0)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    port = httpd.server_address[1]
    try:
        slow = [socket.create_connection(("127.0.0.1", port), timeout=10) for _ in range(20)]
        for connection in slow:
            connection.sendall(f"GET / HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n".encode())
        status, headers, body = exchange(fill(request(), port).encode(), port)
        assert (status, body) == (200, b"page")
        started = time.monotonic()
        for connection in slow:
            assert connection.recv(100) == b""  # closed by the server, unanswered
            connection.close()
        assert time.monotonic() - started < 5
    finally:
        httpd.shutdown()
        httpd.server_close()


def test_files_are_streamed_not_read_whole_for_each_request(tmp_path):
    """Ten clients downloading a 20 MB model at once: the server holds a buffer per client,
    not the file (Python's allocations, traced, stay under a quarter of one copy)."""
    import tracemalloc

    model = tmp_path / "model.tflite"
    model.write_bytes(bytes(20_000_000))
    httpd = server(Site({"model.tflite": str(model)}), "127.0.0.1", 0)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    port = httpd.server_address[1]
    received = []

    def download():  # counts the bytes, keeps none
        with socket.create_connection(("127.0.0.1", port), timeout=30) as connection:
            connection.sendall(fill(request("/model.tflite"), port).encode())
            received.append(sum(iter(lambda: len(connection.recv(1 << 16)), 0)))

    tracemalloc.start()
    try:
        clients = [threading.Thread(target=download) for _ in range(10)]
        for client in clients:
            client.start()
        for client in clients:
            client.join()
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
        httpd.shutdown()
        httpd.server_close()
    assert len(received) == 10 and min(received) > 20_000_000  # the file and the headers
    assert peak < 5_000_000, peak


def test_a_model_path_reaches_the_log_escaped(exported, tmp_path):
    """A file name holding a newline and an escape sequence (a copy of the model) is shown as
    `ls -b` shows it: no forged line, nothing the terminal would run."""
    odd = tmp_path / "page\n\x1b]0;pwned\x07.tflite"
    odd.write_bytes((exported / "model_int8.tflite").read_bytes())
    site = tmp_path / "site"
    command = [sys.executable, "-m", "convmixer_tf.web", "--model", str(odd), "--output", str(site)]
    done = subprocess.run(command, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert "\x1b" not in done.stderr and done.stderr.count("\n") == 1, done.stderr
    assert "page\\n\\x1b]0;pwned\\x07.tflite" in done.stderr


def test_the_model_served_is_the_file_checked_whatever_is_put_at_its_path(exported, tmp_path):
    """The page's model.tflite is the file the command checked when it started, as its
    config describes it: a FIFO put at its path later is never opened (it would hold the
    request forever), another file put there is not served, and the file itself changed
    in place (as `cp` writes) is no longer served at all."""
    model = tmp_path / "swap.tflite"
    original = (exported / "model_int8.tflite").read_bytes()
    model.write_bytes(original)
    with serving("--model", str(model)) as (_, port):
        get = fill(request("/model.tflite"), port).encode()
        assert exchange(get, port)[::2] == (200, original)
        os.remove(model)
        os.mkfifo(model)
        assert exchange(get, port)[::2] == (200, original)
        os.remove(model)
        model.write_bytes((exported / "model.tflite").read_bytes())
        assert exchange(get, port)[::2] == (200, original)
    model.write_bytes(original)
    with serving("--model", str(model)) as (_, port):
        with open(model, "r+b") as f:
            f.write(b"TFL3")
        status, headers, _ = exchange(fill(request("/model.tflite"), port).encode(), port)
        assert (status, headers["X-Content-Type-Options"]) == (404, "nosniff")


@pytest.mark.parametrize(
    "stdout, stderr",
    [("closed", "pipe"), ("pipe", "closed"), ("full", "pipe")],
    ids=["stdout closed", "stderr closed", "stdout full"],
)
def test_web_output_prints_no_result_so_stdout_and_stderr_never_fail_it(
    exported, tmp_path, stdout, stderr
):
    """`web --output` prints nothing on stdout: a closed or full stdout changes nothing (a
    closed one was exit 3); a closed stderr is silence, and the exit code tells (the
    progress line fell back to stdout, then the console's flush made it exit 1)."""
    command = [sys.executable, "-m", "convmixer_tf.web", "--model"]
    command += [str(exported / "model_int8.tflite"), "--output", str(tmp_path / "site")]
    code, out, err = run_with_stdio(command, stdout=stdout, stderr=stderr)
    assert (code, out) == (0, ""), err
    assert "Traceback" not in err
    assert (tmp_path / "site" / "model.tflite").read_bytes() == (
        exported / "model_int8.tflite"
    ).read_bytes()
    code, out, err = run_with_stdio(command, stdout=stdout, stderr=stderr)  # exists: exit 2
    assert (code, out) == (2, ""), err
    assert err in ("", f"error: output {tmp_path / 'site'} exists; pass --force to replace it\n")


def test_serving_with_stdout_closed_ends_at_its_address_line(exported):
    """The address is the serving command's one result: with stdout closed it ends there,
    quietly, as any command whose reader went away (141)."""
    command = [sys.executable, "-m", "convmixer_tf.web", "--port", "0", "--model"]
    code, _, err = run_with_stdio(
        [*command, str(exported / "model_int8.tflite")], stdout="closed", timeout=60
    )
    assert code == 141, err
    assert "Traceback" not in err and "error" not in err, err


@pytest.fixture(scope="module")
def tiny_int8(tmp_path_factory):
    """A tiny 3-class model's full-integer .tflite (uint8 raw RGB in), no class names."""
    from test_hostile_predict import TINY, _samples

    import convmixer_tf
    from convmixer_tf.export.tflite import export_tflite

    model = convmixer_tf.ConvMixer(num_classes=3, include_preprocessing=True, **TINY)
    path = tmp_path_factory.mktemp("tiny") / "model_int8.tflite"
    return export_tflite(model, path, "int8", representative_data=_samples)


def _labelled(source, target, labels: bytes, names):
    from test_hostile_predict import _facts_of, _rewrite_zip

    facts = json.loads(_facts_of(source))
    data = _rewrite_zip(open(source, "rb").read(), "labels.txt", labels)
    data = _rewrite_zip(data, "convmixer.json", json.dumps(dict(facts, class_names=names)).encode())
    target.write_bytes(data)
    return target


def _facts_changed(source, target, **changes):
    from test_hostile_predict import changed

    return changed(source, target, **changes)


@pytest.mark.parametrize(
    "make, words",
    [
        (
            lambda m, t: _facts_changed(m, t / "m.tflite", raw_rgb=False),
            "its facts say raw_rgb False, its graph shows True",
        ),
        (
            lambda m, t: _facts_changed(m, t / "m.tflite", dim=16),
            "its facts say dim 16, its graph shows 8",
        ),
        (
            lambda m, t: _labelled(
                m, t / "m.tflite", b"cat\ndog\nbird\n", ["truck", "dog", "bird"]
            ),
            "class 0 is 'cat' in its labels.txt (what apps show) and 'truck' in its convmixer.json",
        ),
    ],
    ids=["raw-rgb", "dim", "labels"],
)
def test_a_file_whose_facts_disagree_with_its_graph_or_labels_gets_no_page(
    tiny_int8, tmp_path, capsys, make, words
):
    """The page would show MediaPipe's reading of the file (its labels, its own pixels),
    predict the facts': a file whose two disagree is refused, exit 2, nothing written."""
    model = make(tiny_int8, tmp_path)
    assert main(["--model", str(model), "--output", str(tmp_path / "site")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and words in err, err
    assert not (tmp_path / "site").exists()


def test_a_file_whose_name_is_not_utf8_gets_its_page(tiny_int8, tmp_path):
    """It was "truncated or damaged": LiteRT was given the name's surrogate escapes."""
    from convmixer_tf.web import page_config

    name = os.fsdecode(os.path.join(os.fsencode(tmp_path), b"m\xff.tflite"))
    shutil.copy(tiny_int8, name)
    config = page_config(name)
    assert config["file"] == os.fsdecode(b"m\xff.tflite") and config["classes"] == 3
