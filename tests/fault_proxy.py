"""A flaky store for the tests: an HTTP proxy on loopback in front of a real server (moto's S3), answering a
seeded fraction of the requests with a fault instead of forwarding them.

The faults are what S3 does under load or trouble: ``503 SlowDown`` (with S3's XML error body), ``500
InternalError``, and a connection reset (the socket closed without an answer). ``max_in_a_row`` bounds the
faults one request meets on its retries (botocore names each request's attempts with the
``amz-sdk-invocation-id`` header), so a client that retries enough always gets through and a test's outcome
does not depend on the draw. ``fraction=1.0`` with ``max_in_a_row=None`` is a store that stays down.
"""

from __future__ import annotations

import contextlib
import http.client
import random
import socket
import struct
import threading
from collections import Counter
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from hub_server import request_body

FAULTS = ("slowdown", "internal", "reset")
HOP_BY_HOP = {"connection", "keep-alive", "transfer-encoding", "te", "trailer", "upgrade", "proxy-connection"}


def _error_xml(code: str, message: str) -> bytes:
    return (
        f'<?xml version="1.0" encoding="UTF-8"?>\n<Error><Code>{code}</Code><Message>{message}</Message>'
        f"<RequestId>fault-proxy</RequestId></Error>"
    ).encode()


ANSWERS = {
    "slowdown": (503, _error_xml("SlowDown", "Please reduce your request rate.")),
    "internal": (500, _error_xml("InternalError", "We encountered an internal error. Please try again.")),
}


class FaultProxy:
    """``with FaultProxy("http://127.0.0.1:PORT", fraction=0.3, seed=0) as proxy:`` then ``proxy.url`` is the
    endpoint to use; ``proxy.faults`` counts the faults by kind, ``proxy.forwarded`` the requests passed on.
    ``fraction``, ``faults`` and ``max_in_a_row`` may be changed while it runs."""

    def __init__(
        self,
        target: str,
        fraction: float = 0.3,
        seed: int = 0,
        faults: tuple[str, ...] = FAULTS,
        max_in_a_row: int | None = 2,
    ) -> None:
        host, port = target.removeprefix("http://").rstrip("/").split(":")
        self.target = (host, int(port))
        self.fraction, self.faults_to_use, self.max_in_a_row = fraction, faults, max_in_a_row
        self.faults: Counter = Counter()
        self.forwarded = 0
        self._rng, self._lock = random.Random(seed), threading.Lock()
        self._in_a_row: Counter = Counter()
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), _handler(self))
        self._server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self._server.server_address[1]}"

    def __enter__(self) -> FaultProxy:
        threading.Thread(target=self._server.serve_forever, daemon=True).start()
        return self

    def __exit__(self, *exc) -> None:
        self._server.shutdown()
        self._server.server_close()

    def draw(self, invocation: str | None) -> str | None:
        """The fault for this request, or None to forward it (one seeded draw per request, in arrival order)."""
        with self._lock:
            hit = self._rng.random() < self.fraction
            kind = self._rng.choice(self.faults_to_use)
            if (
                invocation
                and self.max_in_a_row is not None
                and self._in_a_row[invocation] >= self.max_in_a_row
            ):
                hit = False
            if not hit:
                self._in_a_row.pop(invocation, None)
                self.forwarded += 1
                return None
            self._in_a_row[invocation] += 1
            self.faults[kind] += 1
            return kind


def _handler(proxy: FaultProxy) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"  # keep-alive, as the S3 client expects

        def log_message(self, *args) -> None:
            pass

        def _body(self) -> bytes:
            return request_body(self)

        def _any(self) -> None:
            body = self._body()  # read whole first: the connection stays usable after a fault answer
            fault = proxy.draw(self.headers.get("amz-sdk-invocation-id"))
            if fault == "reset":
                # SO_LINGER 0: close() sends a TCP reset, as a dropped connection does
                self.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                self.close_connection = True
                return
            if fault is not None:
                status, xml = ANSWERS[fault]
                self._answer(status, [("Content-Type", "application/xml")], xml, head=self.command == "HEAD")
                return
            self._forward(body)

        def _forward(self, body: bytes) -> None:
            headers = {k: v for k, v in self.headers.items() if k.lower() not in HOP_BY_HOP}
            if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
                headers["Content-Length"] = str(len(body))
            conn = http.client.HTTPConnection(*proxy.target, timeout=60)
            try:
                conn.request(self.command, self.path, body=body, headers=headers)
                response = conn.getresponse()
                data = response.read()
                kept = [(k, v) for k, v in response.getheaders() if k.lower() not in HOP_BY_HOP]
            finally:
                conn.close()
            self._answer(response.status, kept, data, head=self.command == "HEAD")

        def _answer(self, status: int, headers: list, data: bytes, head: bool = False) -> None:
            """Send an answer; to a HEAD request without the body, but with the length it would have."""
            self.send_response_only(status)
            for key, value in headers:
                if key.lower() != "content-length":
                    self.send_header(key, value)
            length = dict((k.lower(), v) for k, v in headers).get("content-length") if head else None
            self.send_header("Content-Length", length or str(len(data)))
            self.end_headers()
            if not head:
                self.wfile.write(data)

        do_GET = do_PUT = do_POST = do_DELETE = do_HEAD = _any

    return Handler


@contextlib.contextmanager
def flaky_s3(
    fraction: float = 0.3, seed: int = 0, bucket: str = "bucket"
) -> Iterator[tuple[FaultProxy, object]]:
    """A moto S3 server on loopback (reset, holding an empty ``bucket``) behind a ``FaultProxy``: yields the
    proxy (its ``url`` is the endpoint for the code under test, see ``s3_env``) and a boto3 client of moto
    itself, through no proxy, to set up and read back what the test compares with."""
    import urllib.request

    import boto3
    from moto.server import ThreadedMotoServer

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    try:
        endpoint = "http://{}:{}".format(*server.get_host_and_port())
        urllib.request.urlopen(urllib.request.Request(f"{endpoint}/moto-api/reset", method="POST")).close()
        client = boto3.client(
            "s3", endpoint_url=endpoint, region_name="us-east-1", aws_access_key_id="test",
            aws_secret_access_key="test",
        )  # fmt: skip
        client.create_bucket(Bucket=bucket)
        with FaultProxy(endpoint, fraction=fraction, seed=seed) as proxy:
            yield proxy, client
    finally:
        server.stop()


def s3_env(endpoint: str) -> dict[str, str]:
    """The environment that points the project's S3 client at ``endpoint`` with the test credentials."""
    return {"AWS_ACCESS_KEY_ID": "test", "AWS_SECRET_ACCESS_KEY": "test", "AWS_DEFAULT_REGION": "us-east-1",
            "AWS_ENDPOINT_URL": endpoint}  # fmt: skip


@contextlib.contextmanager
def quick_backoff() -> Iterator[None]:
    """botocore's backoff (a random wait up to 1, 2, 4 … s before retry 1, 2, 3 …) cut to 1/50: the retries
    are the same, the tests just wait less. Forked data workers inherit it."""
    from botocore.retries.standard import ExponentialBackoff

    delay = ExponentialBackoff.delay_amount
    ExponentialBackoff.delay_amount = lambda self, context: delay(self, context) / 50
    try:
        yield
    finally:
        ExponentialBackoff.delay_amount = delay
