"""A misbehaving HTTP proxy on 127.0.0.1 in front of the loopback S3 server.

Every HTTP request a client sends through it is parsed whole (request line,
headers, and the body by ``Content-Length`` or ``Transfer-Encoding: chunked``),
then, by a seeded random draw:

* ``slowdown`` of them (30 % by default) are answered ``503 SlowDown`` with
  S3's XML error body, without being forwarded (the connection stays usable,
  as with S3);
* ``reset`` of them (5 %) have their connection reset (``SO_LINGER`` 0, then
  close: the client sees ``ECONNRESET``), half *before* the request is
  forwarded (nothing happened) and half *after* it was forwarded and answered
  by the server, the answer thrown away (the request took effect, the client
  does not know: a PUT that landed, a conditional ``If-None-Match: *`` PUT
  whose retry then finds its own object and gets ``412``);
* the rest are forwarded on a kept-alive connection to the server and the
  answer relayed unchanged.

:attr:`ChaosProxy.counts` says what it did (requests, forwarded, slowdown,
reset_before, reset_after, the conditional requests among the resets, the
server's status codes), for a test to assert that faults really happened.

    with ChaosProxy(srv.endpoint, seed=7) as proxy:
        opts = srv.storage_options(endpoint=proxy.endpoint)
        ...
        assert proxy.counts["slowdown"] > 0

Only loopback: the proxy listens on 127.0.0.1 and refuses an upstream that is
not a 127.0.0.1 / localhost address. It needs nothing but the standard library.
"""

from __future__ import annotations

import collections
import random
import socket
import struct
import threading
import uuid
from urllib.parse import urlparse

__all__ = ["ChaosProxy", "slowdown_body", "header", "is_conditional_put"]

_MAX_HEAD = 64 * 1024
_IDLE_SECONDS = 120.0  # a kept-alive client connection that stays idle this long is closed


class _Closed(Exception):
    """The peer closed the connection (cleanly, between messages)."""


class _Conn:
    """A socket with a read buffer: lines, exact byte counts, HTTP message heads and bodies."""

    def __init__(self, sock: socket.socket):
        self.sock = sock
        self.buf = bytearray()
        self.answered = 0  # complete answers read on this connection (an upstream one)
        self.got_bytes = False  # any byte of the current answer

    def _fill(self) -> None:
        data = self.sock.recv(256 * 1024)
        if not data:
            raise _Closed()
        self.got_bytes = True
        self.buf += data

    def head(self) -> bytes:
        """Everything up to and including the blank line that ends a message head."""
        while True:
            i = self.buf.find(b"\r\n\r\n")
            if i >= 0:
                out = bytes(self.buf[:i + 4])
                del self.buf[:i + 4]
                return out
            if len(self.buf) > _MAX_HEAD:
                raise ValueError("HTTP message head too long")
            try:
                self._fill()
            except _Closed:
                if self.buf:
                    raise ValueError("connection closed inside a message head") from None
                raise

    def exact(self, n: int) -> bytes:
        while len(self.buf) < n:
            self._fill()
        out = bytes(self.buf[:n])
        del self.buf[:n]
        return out

    def line(self) -> bytes:
        while True:
            i = self.buf.find(b"\r\n")
            if i >= 0:
                out = bytes(self.buf[:i + 2])
                del self.buf[:i + 2]
                return out
            self._fill()

    def chunked(self) -> bytes:
        """A chunked body, raw (sizes, data, last chunk and trailers), as it came."""
        out = bytearray()
        while True:
            size_line = self.line()
            out += size_line
            size = int(size_line.split(b";", 1)[0].strip(), 16)
            if size == 0:
                while True:  # trailers, up to the blank line
                    t = self.line()
                    out += t
                    if t == b"\r\n":
                        return bytes(out)
            out += self.exact(size + 2)

    def rest(self) -> bytes:
        """Everything until the peer closes (a response body delimited by the close)."""
        try:
            while True:
                self._fill()
        except _Closed:
            pass
        out = bytes(self.buf)
        self.buf.clear()
        return out


def _parse_head(raw: bytes) -> tuple[str, list[tuple[str, str]]]:
    lines = raw.decode("latin-1").split("\r\n")
    return lines[0], [(k.strip(), v.strip()) for k, _, v in (ln.partition(":") for ln in lines[1:] if ln)]


def _header(headers, name: str) -> str | None:
    name = name.lower()
    for k, v in headers:
        if k.lower() == name:
            return v
    return None


header = _header  # (for ``only`` / ``reset_if`` callables): the value of a header, or None


def is_conditional_put(method: str, target: str, headers) -> bool:
    """A create-if-absent PUT (``If-None-Match: *``), or one conditional on an ETag (``If-Match``)."""
    return method == "PUT" and (_header(headers, "if-none-match") is not None
                                or _header(headers, "if-match") is not None)


def _body(conn: _Conn, headers, *, response_to: str | None = None, status: int = 0) -> bytes:
    """The body of a message whose head was ``headers`` (a request, or a response to method ``response_to``)."""
    if response_to is not None and (response_to == "HEAD" or 100 <= status < 200 or status in (204, 304)):
        return b""
    te = _header(headers, "transfer-encoding")
    if te is not None and "chunked" in te.lower():
        return conn.chunked()
    cl = _header(headers, "content-length")
    if cl is not None:
        return conn.exact(int(cl))
    if response_to is not None:  # a response without a length ends with the connection
        return conn.rest()
    return b""


def slowdown_body(resource: str, request_id: str) -> bytes:
    """S3's XML error document for ``503 SlowDown``."""
    return ("<?xml version=\"1.0\" encoding=\"UTF-8\"?>\n"
            "<Error><Code>SlowDown</Code><Message>Please reduce your request rate.</Message>"
            f"<Resource>{resource}</Resource><RequestId>{request_id}</RequestId></Error>").encode()


def _reset(sock: socket.socket) -> None:
    """Abort the connection: the peer gets a TCP RST (``ECONNRESET``), not a clean end of stream."""
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    except OSError:
        pass
    try:
        sock.close()
    except OSError:
        pass


def _loopback_upstream(upstream: str) -> tuple[str, int]:
    u = urlparse(upstream if "://" in upstream else f"http://{upstream}")
    if u.scheme != "http" or u.hostname not in ("127.0.0.1", "localhost") or not u.port:
        raise ValueError(f"the chaos proxy only fronts a plain-HTTP server on 127.0.0.1, got {upstream!r}")
    return "127.0.0.1", u.port


class ChaosProxy:
    """A threaded HTTP/1.1 proxy on 127.0.0.1 that throttles and drops connections (see the module doc).

    ``slowdown`` and ``reset`` are the probabilities of a 503 and of a reset per
    request, ``seed`` seeds the one random stream all connections draw from (the
    draws are seeded; which request gets which draw depends on their order).
    ``only`` (a callable of ``(method, target, headers)``) narrows the faults to
    the requests it accepts, the others are always forwarded; ``reset_if`` (the
    same) narrows the resets alone (a request it refuses may still get a 503).
    ``after_share`` is the share of the resets made after forwarding.
    """

    def __init__(self, upstream: str, *, slowdown: float = 0.30, reset: float = 0.05, seed: int = 0,
                 only=None, reset_if=None, after_share: float = 0.5):
        if not (0 <= slowdown and 0 <= reset and slowdown + reset <= 1 and 0 <= after_share <= 1):
            raise ValueError(f"bad fault rates slowdown={slowdown} reset={reset} after_share={after_share}")
        self.upstream = _loopback_upstream(upstream)
        self.slowdown, self.reset, self.only, self.reset_if = slowdown, reset, only, reset_if
        self.after_share = after_share
        self._rng = random.Random(seed)
        self._lock = threading.Lock()
        self.counts: collections.Counter = collections.Counter()
        self._listener: socket.socket | None = None
        self._threads: list[threading.Thread] = []
        self._socks: set[socket.socket] = set()
        self._stopping = threading.Event()
        self.port: int | None = None

    # -- lifecycle ------------------------------------------------------------------------
    def start(self) -> ChaosProxy:
        if self._listener is not None:
            return self
        ls = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        ls.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        ls.bind(("127.0.0.1", 0))
        ls.listen(256)
        self._listener, self.port = ls, ls.getsockname()[1]
        self._stopping.clear()
        t = threading.Thread(target=self._accept, name=f"chaosproxy-{self.port}", daemon=True)
        t.start()
        self._threads.append(t)
        return self

    def stop(self) -> None:
        """Stop listening and abort every open connection."""
        self._stopping.set()
        ls, self._listener = self._listener, None
        if ls is not None:
            try:
                ls.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            ls.close()
        with self._lock:
            socks = list(self._socks)
        for s in socks:  # wake the threads blocked in recv (a close from another thread would not), with a RST
            try:
                s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                s.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
        for t in self._threads:
            t.join(timeout=5)
        self._threads = [t for t in self._threads if t.is_alive()]

    def __enter__(self) -> ChaosProxy:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    @property
    def endpoint(self) -> str:
        if self.port is None:
            raise RuntimeError("the proxy is not started")
        return f"http://127.0.0.1:{self.port}"

    def snapshot(self) -> dict:
        with self._lock:
            return dict(self.counts)

    def __repr__(self) -> str:
        return (f"<ChaosProxy {self.endpoint if self.port else '(stopped)'} -> 127.0.0.1:{self.upstream[1]} "
                f"slowdown={self.slowdown} reset={self.reset} {self.snapshot()}>")

    # -- internals --------------------------------------------------------------------------
    def _count(self, *keys: str) -> None:
        with self._lock:
            for k in keys:
                self.counts[k] += 1

    def _draw(self) -> float:
        with self._lock:
            return self._rng.random()

    def _track(self, sock: socket.socket, on: bool) -> None:
        with self._lock:
            (self._socks.add if on else self._socks.discard)(sock)

    def _accept(self) -> None:
        ls = self._listener
        while not self._stopping.is_set():
            try:
                client, _ = ls.accept()
            except OSError:
                return
            self._count("connections")
            t = threading.Thread(target=self._serve, args=(client,), daemon=True)
            t.start()
            self._threads = [x for x in self._threads if x.is_alive()] + [t]

    def _connect_upstream(self) -> _Conn:
        s = socket.create_connection(self.upstream, timeout=60)
        s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self._track(s, True)
        return _Conn(s)

    def _serve(self, client: socket.socket) -> None:
        client.settimeout(_IDLE_SECONDS)
        client.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self._track(client, True)
        c = _Conn(client)
        up: _Conn | None = None
        abort = True  # reset the client connection at the end, unless it ends cleanly
        try:
            while not self._stopping.is_set():
                try:
                    raw_head = c.head()
                except _Closed:
                    abort = False
                    return
                request_line, headers = _parse_head(raw_head)
                method, target = (request_line.split(" ") + ["", ""])[:2]
                expect = _header(headers, "expect")
                if expect and expect.lower() == "100-continue":
                    # answer the 100 ourselves and take the body; the server gets the request without Expect
                    client.sendall(b"HTTP/1.1 100 Continue\r\n\r\n")
                    headers = [(k, v) for k, v in headers if k.lower() != "expect"]
                    raw_head = ("\r\n".join([request_line, *(f"{k}: {v}" for k, v in headers)])
                                + "\r\n\r\n").encode("latin-1")
                body = _body(c, headers)
                self._count("requests", f"method {method}")
                conditional = any(_header(headers, h) is not None for h in ("if-none-match", "if-match"))
                if conditional:
                    self._count("conditional")

                faulty = self.only is None or self.only(method, target, headers)
                r = self._draw() if faulty else 1.0
                if r < self.slowdown:
                    self._count("slowdown", f"slowdown {method}")
                    rid = uuid.uuid4().hex[:16].upper()
                    payload = slowdown_body(target.split("?", 1)[0], rid)
                    client.sendall((f"HTTP/1.1 503 Slow Down\r\nContent-Type: application/xml\r\n"
                                    f"Content-Length: {len(payload)}\r\nx-amz-request-id: {rid}\r\n"
                                    "\r\n").encode() + payload)
                    continue
                if self.slowdown <= r < self.slowdown + self.reset and self.reset_if is not None \
                        and not self.reset_if(method, target, headers):
                    self._count("reset_spared")
                    r = 1.0
                if r < self.slowdown + self.reset * (1 - self.after_share):
                    self._count("reset_before", f"reset_before {method}",
                                *(["reset_before conditional"] if conditional else []))
                    return  # nothing reached the server; the finally resets the connection
                try:
                    up, (resp_head, resp_body, status, resp_headers, until_close) = self._forward(
                        up, raw_head + body, method)
                except (OSError, _Closed, ValueError):
                    self._count("upstream_down")  # the server is gone (or broke the exchange): reset the client
                    return
                self._count("forwarded", f"status {status}")
                if r < self.slowdown + self.reset:
                    self._count("reset_after", f"reset_after {method}",
                                *(["reset_after conditional"] if conditional else []))
                    return  # it took effect on the server; the answer is lost
                client.sendall(resp_head + resp_body)
                if until_close or "close" in (_header(resp_headers, "connection") or "").lower() \
                        or "close" in (_header(headers, "connection") or "").lower():
                    abort = False
                    return
        except (OSError, ValueError, _Closed):
            return
        finally:
            if up is not None:
                self._close_up(up)
            self._track(client, False)
            if abort:
                _reset(client)
            else:
                try:
                    client.shutdown(socket.SHUT_WR)
                except OSError:
                    pass
                client.close()

    def _forward(self, up: _Conn | None, request: bytes, method: str):
        """Send ``request`` on the kept-alive upstream connection ``up`` (a new one if ``None``) and read the answer.

        A kept-alive connection the server closed while it was idle fails before any byte of an answer;
        then, and only then (as HTTP clients do), the request goes again, on a fresh connection.
        """
        fresh = up is None
        if fresh:
            up = self._connect_upstream()
        try:
            return up, self._exchange(up, request, method)
        except (OSError, _Closed, ValueError):
            stale = not fresh and not up.buf and up.answered > 0 and not up.got_bytes
            self._close_up(up)
            if not stale:
                raise
        up = self._connect_upstream()
        try:
            return up, self._exchange(up, request, method)
        except BaseException:
            self._close_up(up)
            raise

    def _exchange(self, up: _Conn, request: bytes, method: str):
        up.got_bytes = False
        up.sock.sendall(request)
        while True:
            head = up.head()
            status_line, headers = _parse_head(head)
            status = int(status_line.split(" ")[1])
            if 100 <= status < 200 and status != 101:
                continue  # an interim answer (we never forward Expect, but be safe)
            until_close = (method != "HEAD" and status not in (204, 304)
                           and _header(headers, "content-length") is None
                           and "chunked" not in (_header(headers, "transfer-encoding") or "").lower())
            body = _body(up, headers, response_to=method, status=status)
            up.answered += 1
            return head, body, status, headers, until_close

    def _close_up(self, up: _Conn) -> None:
        self._track(up.sock, False)
        try:
            up.sock.close()
        except OSError:
            pass
