"""``data-tools build`` on hostile inputs: an endless download and a decompression bomb end as failed rows
(counted in ``_stats.json``), never as a crashed worker or an exhausted machine."""

from __future__ import annotations

import contextlib
import csv
import http.server
import io
import json
import struct
import threading
import time
import zlib
from collections.abc import Iterator
from pathlib import Path

import pyarrow.parquet as pq
from helpers import serve_files
from PIL import Image

from data_tools.cli import main

ENDLESS_SECONDS = 30.0
"""The endless server gives up on its own after this long, whatever the client does."""


@contextlib.contextmanager
def endless_server(image: bytes) -> Iterator[tuple[str, dict]]:
    """127.0.0.1 server: `/endless` streams zeros without a length until the client hangs up (or
    ENDLESS_SECONDS pass), anything else gets `image`. Yields the base URL and counters."""
    seen = {"endless_requests": 0, "endless_bytes": 0}

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:  # noqa: N802 - the http.server API
            if self.path != "/endless":
                self.send_response(200)
                self.send_header("Content-Length", str(len(image)))
                self.end_headers()
                self.wfile.write(image)
                return
            seen["endless_requests"] += 1
            self.send_response(200)
            self.end_headers()  # no Content-Length: the body ends when the connection does
            chunk, deadline = bytes(2**16), time.monotonic() + ENDLESS_SECONDS
            with contextlib.suppress(OSError):
                while time.monotonic() < deadline:
                    self.wfile.write(chunk)
                    seen["endless_bytes"] += len(chunk)

        def log_message(self, *args) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}", seen
    finally:
        server.shutdown()
        server.server_close()


def png(width: int, height: int) -> bytes:
    out = io.BytesIO()
    Image.new("RGB", (width, height), (200, 30, 30)).save(out, format="PNG")
    return out.getvalue()


def declared_png(width: int, height: int) -> bytes:
    """A ~100-byte PNG whose header declares `width` x `height` (the body is a few rows' worth)."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    body = zlib.compress(bytes(3 * width + 1))
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", body) + chunk(b"IEND", b"")


def build(tmp_path: Path, rows: list[tuple[str, str]], *flags: str) -> tuple[list[dict], dict]:
    tmp_path.mkdir(exist_ok=True)
    table = tmp_path / "rows.csv"
    with table.open("w", newline="") as f:
        csv.writer(f).writerows([("url", "caption"), *rows])
    out = tmp_path / "out"
    assert main(["build", "--input", str(table), "--output", str(out), "--image-size", "8", *flags]) == 0
    return pq.read_table(out / "00000.parquet").to_pylist(), json.loads(
        (out / "00000_stats.json").read_text()
    )


def test_endless_download_stops_at_the_byte_limit(tmp_path: Path) -> None:
    limit = 10**6
    with endless_server(png(4, 4)) as (url, seen):
        started = time.monotonic()
        rows, stats = build(tmp_path, [(f"{url}/endless", "endless"), (f"{url}/ok.png", "ok")],
                            "--max-image-bytes", str(limit), "--timeout", "60")  # fmt: skip
        elapsed = time.monotonic() - started
    assert [r["status"] for r in rows] == ["failed_to_download", "success"]
    assert f"larger than the maximum of {limit} bytes" in rows[0]["error_message"]
    assert (stats["failed_to_download"], stats["successes"], stats["count"]) == (1, 1, 2)
    assert elapsed < ENDLESS_SECONDS / 2  # stopped by the limit, not by the server or the timeout
    assert seen["endless_requests"] == 1  # a too-large image is not retried
    assert seen["endless_bytes"] < 64 * limit  # the server was cut off (socket buffers hold a few MB)


def test_local_file_over_the_byte_limit(tmp_path: Path) -> None:
    (tmp_path / "big.png").write_bytes(png(64, 64) + bytes(5000))
    (tmp_path / "small.png").write_bytes(png(2, 2))
    paths = [(str(tmp_path / "big.png"), "big"), (str(tmp_path / "small.png"), "small")]
    limit = len(png(2, 2)) + 10
    rows, stats = build(tmp_path, paths, "--max-image-bytes", str(limit))
    assert [r["status"] for r in rows] == ["failed_to_download", "success"]
    assert f"maximum of {limit} bytes" in rows[0]["error_message"]
    assert stats["failed_to_download"] == 1


def test_decompression_bombs_are_failed_to_decode(tmp_path: Path) -> None:
    """PIL's limit as set by --max-image-pixels: above it (PIL warns: an error here) and above twice it
    (PIL raises) both fail the row; the default limit stops a tiny file declaring 20000 x 20000."""
    files = {"ok.png": png(8, 8), "over.png": png(12, 12), "far.png": png(20, 20)}
    files["bomb.png"] = declared_png(20000, 20000)
    pixels_before = Image.MAX_IMAGE_PIXELS
    with serve_files(files) as url:
        rows, stats = build(tmp_path / "low", [(f"{url}/{n}", n) for n in files], "--max-image-pixels", "100")
        default_rows, _ = build(tmp_path / "default", [(f"{url}/bomb.png", "bomb")])
    assert [r["status"] for r in rows] == [
        "success",
        "failed_to_decode",
        "failed_to_decode",
        "failed_to_decode",
    ]
    assert "144 pixels" in rows[1]["error_message"] and "400 pixels" in rows[2]["error_message"]
    assert all("decompression bomb" in r["error_message"] for r in rows[1:])
    assert (stats["failed_to_decode"], stats["successes"]) == (3, 1)
    assert default_rows[0]["status"] == "failed_to_decode"
    assert f"{20000 * 20000} pixels" in default_rows[0]["error_message"]
    assert pixels_before == Image.MAX_IMAGE_PIXELS  # the build's limit does not leak into the process
