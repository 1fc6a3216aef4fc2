"""Opening shard URLs: local paths, s3:// (s3fs, see `webshards.s3`), http(s):// and pipe:COMMAND, with retries."""

from __future__ import annotations

import contextlib
import logging
import re
import subprocess
import time
import urllib.parse
from collections.abc import Iterator
from typing import BinaryIO

from webshards.retries import StoreUnreachable, count_retry

log = logging.getLogger("webshards")


def url_to_fs(url: str) -> tuple:
    """The fsspec filesystem of `url` and the path in it, for readers and for writers that list, put and
    remove objects. Every `s3://` filesystem is built here, by `webshards.s3` (the endpoint from
    AWS_ENDPOINT_URL, botocore's retries, timeouts, retries counted, a dead store in one line)."""
    if url.startswith("s3://"):
        from webshards.s3 import s3_filesystem  # s3fs is an optional dependency (the `s3` extra)

        return s3_filesystem(url)
    import fsspec

    return fsspec.core.url_to_fs(url)


_URL = re.compile(r"[A-Za-z][\w+.-]*://(?:(?!::)[^\s'\"])+")
"""A URL inside a text: up to white space, a quote, or the `::` that joins shard sources."""


def _redact_one(url: str) -> str:
    parts = urllib.parse.urlsplit(url)
    netloc = parts.netloc
    if "@" in netloc:  # user:password@ keeps the user; a lone user part may be a token (https://TOKEN@host)
        userinfo, host = netloc.rsplit("@", 1)
        netloc = f"{userinfo.split(':', 1)[0]}:***@{host}" if ":" in userinfo else f"***@{host}"
    query = "&".join(f"{q.split('=', 1)[0]}=***" if "=" in q else q for q in parts.query.split("&") if q)
    return urllib.parse.urlunsplit(parts._replace(netloc=netloc, query=query))


def redact_url(text: str) -> str:
    """`text` (a URL, a `::`-joined spec, or a message holding URLs) with each URL's credentials shown as
    `***`: the password of `user:password@` (a lone user part too) and every query value (signed-URL
    tokens such as `?sig=…`).
    What may be logged or saved in a run's config."""
    return _URL.sub(lambda m: _redact_one(m.group(0)), text)


@contextlib.contextmanager
def _pipe(command: str) -> Iterator[BinaryIO]:
    proc = subprocess.Popen(command, shell=True, stdout=subprocess.PIPE)
    try:
        yield proc.stdout
    finally:
        proc.stdout.close()
        if proc.wait() != 0:
            log.warning("pipe:%s exited with %d", command, proc.returncode)


def local_path(url: str) -> str | None:
    """The file path of a local URL (a plain path or ``file://``), None for pipe:, s3://, http(s)://."""
    if url.startswith("pipe:") or ("://" in url and not url.startswith("file://")):
        return None
    return url.removeprefix("file://")


def _open_once(url: str) -> contextlib.AbstractContextManager[BinaryIO]:
    if url.startswith("pipe:"):
        return _pipe(url[len("pipe:") :])
    path = local_path(url)
    if path is not None:
        return open(path, "rb")
    fs, path = url_to_fs(url)
    return fs.open(path, "rb")


def _missing(error: OSError) -> bool:
    """Whether a failure to open is a missing file, which no retry cures. fsspec's HTTP filesystem reports
    every failure to open as FileNotFoundError; what it wraps tells a 404 from a 503 or a dropped connection."""
    if not isinstance(error, FileNotFoundError):
        return False
    cause = error.__cause__
    status = getattr(cause, "status", None)  # aiohttp's ClientResponseError
    return (
        cause is None
        or isinstance(cause, FileNotFoundError)
        or (status is not None and status < 500 and status != 429)
    )


def _failure(error: OSError) -> str:
    """One line for a failure to open: what an HTTP FileNotFoundError wraps, else the error itself."""
    shown = error.__cause__ if isinstance(error, FileNotFoundError) and error.__cause__ is not None else error
    return redact_url(f"{type(shown).__name__}: {shown}".splitlines()[0])


def open_url(url: str, retries: int = 3, backoff: float = 0.5) -> contextlib.AbstractContextManager[BinaryIO]:
    """Open a shard for streaming. A transient failure (an OSError other than a missing file) is retried up
    to `retries` times with exponential backoff from `backoff` s, each retry counted (`webshards.retries`);
    when every attempt failed, a `StoreUnreachable` says so in one line. Not for `s3://`: the S3 client
    retries each of its requests itself (`webshards.s3`), and a second layer here would multiply them."""
    retries = 0 if url.startswith("s3://") else retries
    start = time.monotonic()
    for attempt in range(retries + 1):
        try:
            return _open_once(url)
        except OSError as e:
            if _missing(e):
                raise
            if attempt == retries:
                if retries == 0 or local_path(url) is not None:
                    raise  # not retried, or a local file: its own error says more than "unreachable"
                raise StoreUnreachable(
                    redact_url(url), attempt + 1, time.monotonic() - start, _failure(e)
                ) from e
            delay = backoff * 2**attempt
            log.debug("opening %s failed (%s); retry %d/%d in %.1fs", redact_url(url), _failure(e), attempt + 1,
                      retries, delay)  # fmt: skip
            count_retry(f"{redact_url(url)}, attempt {attempt + 2} after {_failure(e)}")
            time.sleep(delay)
    raise AssertionError("unreachable")


def check_readable(url: str) -> None:
    """Raise a clear error when a shard cannot be opened (start-up check of each source)."""
    if url.startswith("pipe:"):
        return
    try:
        with open_url(url, retries=1) as f:
            f.read(1)
    except OSError as e:
        raise FileNotFoundError(redact_url(f"shard not readable: {url} ({e})")) from None
