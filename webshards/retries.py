"""Retries of storage requests, counted per process, and the one line a store that stays down ends with.

The retrying itself belongs to the clients (botocore for ``s3://``, see ``webshards.s3``; ``urls.open_url``
for ``http(s)://``, whose fsspec client has none). What they share is here: every retried request is
``count_retry``-ed, the count is logged (a warning on the first retry of a process and on every
``LOG_EVERY``-th) and read by whoever reports a job (``retries_so_far``: pretrain's metrics rows, data-tools'
job summary), and a request that failed for good after retries is a ``StoreUnreachable`` whose message is one
line: ``s3://bucket/key: unreachable after 5 attempts over 7.3 s (last: 503 SlowDown: …)``.
"""

from __future__ import annotations

import logging
import threading

log = logging.getLogger("webshards")

LOG_EVERY = 100
"""A warning line on a process's first retry, then on every this many."""

_lock = threading.Lock()
_count = 0


class StoreUnreachable(ConnectionError):
    """A storage request failed every attempt with errors worth retrying (an OSError, as a store's failures
    are): one line naming the object, the attempts, the time they took and the last error (the caller stars
    any credentials in ``where`` and ``last``)."""

    def __init__(self, where: str, attempts: int, seconds: float, last: str) -> None:
        last = " ".join(last.split())  # one line, whatever the client's message held (aiohttp's span lines)
        super().__init__(
            f"{where}: unreachable after {attempts} attempts over {seconds:.1f} s (last: {last})"
        )


def count_retry(what: str) -> None:
    """Count one retried request of this process; ``what`` (the object, the attempt, why; credentials
    already starred, see ``urls.redact_url``) goes into the warning when one is due."""
    global _count
    with _lock:
        _count += 1
        n = _count
    if n == 1 or n % LOG_EVERY == 0:
        log.warning(
            "storage: %d request(s) retried so far in this process (latest: %s)", n, " ".join(what.split())
        )


def retries_so_far() -> int:
    """Requests this process has retried (every store, every thread) since it started; a forked child
    starts from its parent's count, so what a piece of work retried is a difference of two readings."""
    return _count
