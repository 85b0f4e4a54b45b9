"""The guard in front of Triton's HTTP endpoint: a request-size limit.

tritonserver 2.51 has been seen to die (SIGSEGV) on HTTP request bodies of about 6 MB
(triton-inference-server/server#5840) and has no option that limits a body's size. When
`fewstep serve --http` is asked for, Triton's HTTP server listens on a private loopback
port and this proxy listens on the public one: it reads a request's headers, answers
413 to a body over the limit (by Content-Length, or while reading a chunked body), so
that body never reaches Triton, and forwards everything else unchanged. Our requests are a few
integers per image, so the default limit (1 MiB) is far above any real request.
"""
from __future__ import annotations

import http.client
import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

DEFAULT_MAX_BODY = 1 << 20
LINGER_MAX = 256 << 20  # after a 413, at most this much of the refused body is read and dropped
HOP_BY_HOP = {"connection", "keep-alive", "transfer-encoding", "te", "trailer", "upgrade",
              "proxy-authenticate", "proxy-authorization", "content-length"}


class BodyTooLarge(Exception):
    pass


def _read_chunked(rfile, limit: int) -> bytes:
    body = bytearray()
    while True:
        size = int(rfile.readline(1024).split(b";", 1)[0].strip() or b"0", 16)
        if size == 0:
            while rfile.readline(1024) not in (b"\r\n", b"\n", b""):  # trailers
                pass
            return bytes(body)
        if len(body) + size > limit:
            raise BodyTooLarge
        body += rfile.read(size)
        rfile.readline(1024)


def make_handler(upstream: tuple[str, int], max_body: int):
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, *args):  # quiet: Triton logs the requests it serves
            pass

        def _discard(self, length: int) -> None:
            """Read and drop what the client still sends (at most `length` bytes, for a few
            seconds), so that it can read our answer instead of a connection reset."""
            try:
                self.connection.settimeout(5.0)
                while length > 0:
                    got = self.rfile.read1(min(length, 1 << 20)) if hasattr(self.rfile, "read1") else b""
                    if not got:
                        break
                    length -= len(got)
            except OSError:
                pass

        def _refuse(self, code: int, message: str) -> None:
            data = json.dumps({"error": message}).encode()
            self.send_response(code)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.send_header("Connection", "close")  # the rest of the body is never read
            self.end_headers()
            self.wfile.write(data)
            self.close_connection = True

        def _forward(self) -> None:
            too_large = f"request body over the limit of {max_body} bytes (fewstep serve --http-max-body)"
            try:
                if "chunked" in self.headers.get("Transfer-Encoding", "").lower():
                    body = _read_chunked(self.rfile, max_body)
                else:
                    length = int(self.headers.get("Content-Length") or 0)
                    if length < 0:
                        raise ValueError
                    if length > max_body:
                        raise BodyTooLarge
                    body = self.rfile.read(length) if length else None
            except BodyTooLarge:
                self._refuse(413, too_large)
                return self._discard(min(int(self.headers.get("Content-Length") or 0), LINGER_MAX))
            except ValueError:
                return self._refuse(400, "malformed Content-Length or chunked body")
            headers = {k: v for k, v in self.headers.items() if k.lower() not in HOP_BY_HOP}
            conn = http.client.HTTPConnection(*upstream, timeout=600)
            try:
                conn.request(self.command, self.path, body=body, headers=headers)
                resp = conn.getresponse()
                data = resp.read()
            except (OSError, http.client.HTTPException) as e:
                return self._refuse(502, f"tritonserver did not answer ({e})")
            finally:
                conn.close()
            self.send_response(resp.status, resp.reason)
            for k, v in resp.getheaders():
                if k.lower() not in HOP_BY_HOP:
                    self.send_header(k, v)
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            if self.command != "HEAD":
                self.wfile.write(data)

        do_GET = do_POST = do_PUT = do_DELETE = do_HEAD = do_OPTIONS = _forward

    return Handler


class _Server(ThreadingHTTPServer):
    allow_reuse_address = True  # restart on the same port at once, as Triton does
    daemon_threads = True


class HttpGuard:
    """The proxy: listens on (host, port), forwards to Triton's HTTP at upstream."""

    def __init__(self, host: str, port: int, upstream: tuple[str, int], max_body: int = DEFAULT_MAX_BODY):
        self.httpd = _Server((host, port), make_handler(upstream, max_body))
        self._thread = threading.Thread(target=self.httpd.serve_forever, name="fewstep-http-guard", daemon=True)

    def start(self) -> "HttpGuard":
        self._thread.start()
        return self

    def stop(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()
