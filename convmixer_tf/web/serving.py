"""Serving a `Site` over HTTP: GET and HEAD of its names and nothing else, to requests
addressed to this server only, every answer (errors included) under the page's Content
Security Policy and nosniff.

Addressed to this server means that the request names, in its Host header (or in an
absolute request target), the address the connection reached with the port served:
`127.0.0.1:8000`, `[::1]:8000`, the machine's address on its network when it serves
every interface (`--host 0.0.0.0` or `::`), `localhost` on the loopback, or the name
given as --host. Anything else is 421 Misdirected Request: a page of another site that
rebinds its name to this machine's address (DNS rebinding) reads nothing. A request
with no Host header, or with two, is 400: every browser and HTTP/1.1 client sends one.
"""

from __future__ import annotations

import contextlib
import errno
import http.server
import ipaddress
import mimetypes
import os
import shutil
import socket
import socketserver
import sys
import urllib.parse
from typing import Optional, Tuple, Union

from convmixer_tf.errors import BadInput
from convmixer_tf.web import CSP, Site

HEADERS = {"Content-Security-Policy": CSP, "X-Content-Type-Options": "nosniff"}
TYPES = {".mjs": "text/javascript", ".js": "text/javascript", ".wasm": "application/wasm"}
WILDCARDS = ("0.0.0.0", "::")
TIMEOUT_S = 30  # a client that stops sending mid-request holds its thread this long at most
Host = Union[ipaddress.IPv4Address, ipaddress.IPv6Address, str]


def server(site: Site, host: str = "127.0.0.1", port: int = 8000) -> http.server.HTTPServer:
    """An HTTP server of `site` on `host` (an address or a name, IPv4 or IPv6: the family
    is getaddrinfo's) and `port` (0: a free one; `server_address` says which), not yet
    serving (call serve_forever); BadInput saying what is wrong with the address."""
    family, address = _resolve(host, port)
    name = None if _address(host) else host.lower()
    handler = type("Handler", (_Handler,), {"site": site, "host_name": name})
    kind = type("Server", (_Server,), {"address_family": family})
    try:
        return kind(address, handler)
    except OSError as err:
        raise BadInput(
            f"cannot serve on {url_host(host)}:{port}: {_advice(err, host, port)}"
        ) from None


def url_host(host: str) -> str:
    """`host` as a URL writes it: an IPv6 address in brackets."""
    return f"[{host}]" if ":" in host else host  # only IPv6 addresses hold a ":"


def addressed_here(authority: str, *, local: str, port: int, name: Optional[str] = None) -> bool:
    """Whether `authority` (a Host header's value) names this server as the connection to
    `local` (the address it reached) on `port` saw it: that address, `localhost` where it
    is a loopback address, or `name`; with `port`, which only port 80 may leave out."""
    parsed = _authority(authority)
    if parsed is None:
        return False
    host, given_port = parsed
    if given_port != port and not (given_port is None and port == 80):
        return False
    here = _address(local.split("%")[0])  # the address of this end of the connection
    loopback = here is not None and here.is_loopback
    return host in {here, name, "localhost" if loopback else None} - {None}


def _authority(value: str) -> Optional[Tuple[Host, Optional[int]]]:
    """(host, port) of `host[:port]`: an address for an IP literal (IPv6 in brackets),
    else the name in lower case; port None where absent. None when malformed."""
    if value.startswith("["):
        inside, bracket, rest = value[1:].partition("]")
        host = _address(inside)
        if not bracket or host is None or ":" not in inside:  # IPv6 only
            return None
    else:
        text = value.split(":", 1)[0]
        rest = value[len(text) :]
        host = _address(text) or text.lower()
    digits = rest[1:]
    if not rest:
        return host, None
    if rest[0] != ":" or not (digits.isascii() and digits.isdigit() and len(digits) <= 5):
        return None
    return host, int(digits)


def _address(text: str) -> Optional[Union[ipaddress.IPv4Address, ipaddress.IPv6Address]]:
    """The IP address `text` writes (an IPv4 client of a dual-stack socket as IPv4); None
    for a name."""
    try:
        address = ipaddress.ip_address(text)
    except ValueError:
        return None
    return getattr(address, "ipv4_mapped", None) or address


def _resolve(host: str, port: int) -> tuple:
    """(family, socket address) of `host`, as getaddrinfo gives it first."""
    try:
        found = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except (OSError, UnicodeError, ValueError) as err:
        reason = getattr(err, "strerror", None) or err
        raise BadInput(
            f"--host {host}: not an address, nor a name this machine can resolve ({reason}); "
            "give one of its addresses: 127.0.0.1 (this machine only), 0.0.0.0 or :: (every "
            "interface)"
        ) from None
    return found[0][0], found[0][4]


def _advice(err: OSError, host: str, port: int) -> str:
    """What went wrong binding `host`:`port`, and what to do about it."""
    if err.errno == errno.EADDRINUSE:
        return "the port is in use; pass another --port (0 picks a free one)"
    if err.errno == errno.EACCES and 0 < port < 1024:
        return "permission denied: ports below 1024 need privileges; pass --port 1024 or above"
    if err.errno == errno.EADDRNOTAVAIL:
        return (
            f"{host} is not an address of this machine; pass one of its addresses to --host "
            "(127.0.0.1: this machine only; 0.0.0.0 or ::: every interface)"
        )
    if err.errno == errno.EAFNOSUPPORT:
        return "this machine has no IPv6; pass an IPv4 address to --host"
    return str(err.strerror or err)


class _Server(http.server.ThreadingHTTPServer):
    def server_bind(self):
        if self.address_family == socket.AF_INET6 and self.server_address[0] == "::":
            with contextlib.suppress(OSError):  # IPv4 clients too, where the system allows
                self.socket.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
        socketserver.TCPServer.server_bind(self)  # HTTPServer's would look its name up in DNS
        self.server_name, self.server_port = self.server_address[:2]

    def handle_error(self, request, client_address):
        if not isinstance(sys.exc_info()[1], ConnectionError):  # a client gone mid-answer
            super().handle_error(request, client_address)


class _Handler(http.server.BaseHTTPRequestHandler):
    """GET and HEAD of the site's names; 404 for anything else (no folder is ever listed
    or walked: a name either is in the site or is not)."""

    site: Site
    host_name: Optional[str]  # --host, where it is a name and not an address
    default_request_version = "HTTP/1.0"  # never answer as HTTP/0.9, which has no headers
    timeout = TIMEOUT_S
    _version = default_request_version

    @property
    def request_version(self) -> str:
        return self._version

    @request_version.setter
    def request_version(self, version: str) -> None:
        # http.server sends no status line and no headers (so no CSP, no nosniff) when the
        # request line names HTTP/0.9, whatever the status: every such request is answered
        # as the HTTP/1.0 one it otherwise is, errors found while parsing it included.
        self._version = "HTTP/1.0" if version == "HTTP/0.9" else version

    def version_string(self):
        return "convmixer-web"

    def end_headers(self):
        for key, value in HEADERS.items():  # every answer, send_error's included
            self.send_header(key, value)
        super().end_headers()

    def parse_request(self) -> bool:
        if not super().parse_request():
            return False
        refused = self._refused()
        if refused:
            self.send_error(*refused)
        return not refused

    def _refused(self) -> Optional[Tuple[int, str]]:
        """(status, reason) for a request not addressed to this server; else None, with
        `path` the path of an absolute request target."""
        hosts = self.headers.get_all("Host") or []
        if len(hosts) != 1:
            return 400, "one Host header is required"
        authority = hosts[0].strip(" \t")  # a field's value, without the spaces around it
        if self.path[:7].lower() == "http://":
            try:
                target = urllib.parse.urlsplit(self.path)
            except ValueError:
                return 400, "bad request target"
            authority = target.netloc
            self.path = "/" + target.path.lstrip("/") + (f"?{target.query}" if target.query else "")
        elif not self.path.startswith("/"):
            return 400, "the request target is not a path"
        local = self.connection.getsockname()[0]
        port = self.server.server_address[1]
        if not addressed_here(authority, local=local, port=port, name=self.host_name):
            return 421, "not addressed to this server: open the address it printed"
        return None

    def do_GET(self):
        self._answer(body=True)

    def do_HEAD(self):
        self._answer(body=False)

    def _answer(self, body: bool) -> None:
        name = self.path.split("?", 1)[0].split("#", 1)[0][1:] or "index.html"
        try:
            data = self.site.open(name)
        except KeyError:
            self.send_error(404, "not part of this page")
            return
        except OSError:  # gone, no longer a regular file, or changed since it was checked
            self.send_error(404, "no longer the file this command started with")
            return
        with data:
            size = data.seek(0, os.SEEK_END)
            data.seek(0)
            self.send_response(200)
            kind = TYPES.get(os.path.splitext(name)[1]) or mimetypes.guess_type(name)[0]
            self.send_header("Content-Type", kind or "application/octet-stream")
            self.send_header("Content-Length", str(size))
            self.send_header("Cache-Control", "no-cache")
            self.end_headers()
            if body:
                shutil.copyfileobj(data, self.wfile)

    def log_message(self, format, *args):
        pass  # a request log would bury the address line
