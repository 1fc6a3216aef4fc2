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


def open_url(url: str, retries: int = 3, backoff: float = 0.5) -> contextlib.AbstractContextManager[BinaryIO]:
    """Open a shard for streaming. A transient failure (an OSError) is retried up to `retries` times with
    exponential backoff from `backoff` s, each retry counted (`webshards.retries`); when every attempt
    failed, a `StoreUnreachable` says so in one line. Not for `s3://`: the S3 client retries each of its
    requests itself (`webshards.s3`), and a second layer here would multiply the attempts."""
    retries = 0 if url.startswith("s3://") else retries
    start = time.monotonic()
    for attempt in range(retries + 1):
        try:
            return _open_once(url)
        except FileNotFoundError:
            raise
        except OSError as e:
            if attempt == retries:
                if retries == 0:
                    raise
                seconds, last = time.monotonic() - start, redact_url(f"{type(e).__name__}: {e}")
                raise StoreUnreachable(redact_url(url), attempt + 1, seconds, last) from e
            delay = backoff * 2**attempt
            log.debug("opening %s failed (%s); retry %d/%d in %.1fs", redact_url(url), redact_url(str(e)),
                      attempt + 1, retries, delay)  # fmt: skip
            count_retry(redact_url(f"{url}, attempt {attempt + 2} after {type(e).__name__}: {e}"))
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
