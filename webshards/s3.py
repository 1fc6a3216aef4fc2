"""The S3 filesystem every ``s3://`` URL is opened with (``urls.url_to_fs``): s3fs on botocore, retrying
with botocore's own retry modes, every retry counted (``webshards.retries``), and a request that fails for
good after its retries raised as ``retries.StoreUnreachable``, one line.

Settings, read from the environment when a filesystem is built:

- ``AWS_ENDPOINT_URL``: the endpoint (an S3-compatible store; moto in the tests).
- ``AWS_RETRY_MODE``: botocore's retry mode, ``standard`` unless set (``adaptive`` also slows this client's
  requests after throttling; ``legacy`` is botocore's old one). The AWS config file's retry keys are not read.
- ``AWS_MAX_ATTEMPTS``: attempts per request, the first included; 5 unless set.
- ``WEBSHARDS_S3_CONNECT_TIMEOUT``, ``WEBSHARDS_S3_READ_TIMEOUT``: seconds one attempt waits to connect (5)
  and for each read of the answer (15); s3fs's defaults.

botocore (standard mode) retries connection errors, timeouts, HTTP 500/502/503/504 and throttling (503
SlowDown), after a random wait of up to 1, 2, 4, 8 … s (at most 20 s), while its per-client retry quota
lasts (a store failing everything soon exhausts it). s3fs then tries a call ``TRIES`` times in all: once
more after botocore gave up on throttling or a dropped connection, and again when an answer's body broke
off midway, which botocore cannot retry. So one request of a store that stays down ends after at most
``TRIES`` × ``AWS_MAX_ATTEMPTS`` attempts, each bounded by the timeouts.
"""

from __future__ import annotations

import contextvars
import os
import time
from dataclasses import dataclass
from typing import Any

from botocore.exceptions import ClientError, HTTPClientError
from botocore.exceptions import ConnectionError as BotoConnectionError
from s3fs import S3FileSystem

from webshards.retries import StoreUnreachable, count_retry

TRIES = 2
"""s3fs's tries of one call (its ``retries``; the default 5 would multiply botocore's attempts by five)."""
THROTTLING = frozenset(
    {"SlowDown", "Throttling", "ThrottlingException", "RequestLimitExceeded", "TooManyRequests"}
)
"""Error codes of a store asking for fewer requests (botocore retries them)."""


@dataclass(frozen=True)
class S3Settings:
    """What the S3 client of a filesystem is built with (see the module docstring)."""

    endpoint: str | None = None
    retry_mode: str = "standard"
    max_attempts: int = 5
    connect_timeout: float = 5.0
    read_timeout: float = 15.0

    def __post_init__(self) -> None:
        if self.retry_mode not in ("standard", "adaptive", "legacy"):
            raise ValueError(f"AWS_RETRY_MODE must be standard, adaptive or legacy, got {self.retry_mode!r}")
        if self.max_attempts < 1:
            raise ValueError(f"AWS_MAX_ATTEMPTS must be at least 1, got {self.max_attempts}")
        for name in ("connect_timeout", "read_timeout"):
            if not getattr(self, name) > 0:
                raise ValueError(f"WEBSHARDS_S3_{name.upper()} must be positive, got {getattr(self, name)}")

    @classmethod
    def from_env(cls) -> S3Settings:
        env, default = os.environ, cls()
        try:
            return cls(
                endpoint=env.get("AWS_ENDPOINT_URL") or None,
                retry_mode=env.get("AWS_RETRY_MODE", default.retry_mode),
                max_attempts=int(env.get("AWS_MAX_ATTEMPTS", default.max_attempts)),
                connect_timeout=float(env.get("WEBSHARDS_S3_CONNECT_TIMEOUT", default.connect_timeout)),
                read_timeout=float(env.get("WEBSHARDS_S3_READ_TIMEOUT", default.read_timeout)),
            )
        except (TypeError, ValueError) as error:
            raise ValueError(f"S3 settings from the environment: {error}") from None

    def options(self) -> dict[str, Any]:
        """The keyword arguments of ``S3FileSystem``."""
        config = {
            "retries": {"mode": self.retry_mode, "total_max_attempts": self.max_attempts},
            "connect_timeout": self.connect_timeout,
            "read_timeout": self.read_timeout,
        }
        client = {"endpoint_url": self.endpoint} if self.endpoint else {}
        return {"client_kwargs": client, "config_kwargs": config}


@dataclass
class _Call:
    """One S3 API call of s3fs (all its attempts): what it is about and how it went so far."""

    where: str
    attempts: int = 0
    last: str = ""


_CALL: contextvars.ContextVar[_Call | None] = contextvars.ContextVar("webshards_s3_call", default=None)
"""The call the running task makes: botocore's event handlers run in the task that makes the request."""


def _attempt_starting(**kwargs: Any) -> None:
    """botocore's ``request-created``: each attempt of a request, the first included."""
    call = _CALL.get()
    if call is not None:
        call.attempts += 1
        if call.attempts > 1:
            count_retry(f"{call.where}, attempt {call.attempts} after {call.last or 'an error'}")


def _attempt_ended(
    response: Any = None, caught_exception: BaseException | None = None, **kwargs: Any
) -> None:
    """botocore's ``needs-retry``: remember why an attempt failed (botocore's handler decides about retrying)."""
    call = _CALL.get()
    if call is None:
        return
    if caught_exception is not None:
        call.last = f"{type(caught_exception).__name__}: {caught_exception}"
    elif response is not None and response[0].status_code >= 300:
        call.last = _status(response[0].status_code, response[1].get("Error", {}).get("Code", ""))


def _transient(error: BaseException) -> bool:
    """Whether ``error`` (as s3fs raises it: a ClientError translated to an OSError keeps it as its cause)
    is one that retrying may cure: a lost connection, a timeout, a 5xx or throttling answer."""
    cause = error.__cause__ if isinstance(error.__cause__, ClientError) else error
    if isinstance(cause, ClientError):
        status = cause.response.get("ResponseMetadata", {}).get("HTTPStatusCode", 0)
        return status >= 500 or status == 429 or cause.response.get("Error", {}).get("Code") in THROTTLING
    return isinstance(error, BotoConnectionError | HTTPClientError | TimeoutError)


def _status(status: int, code: str) -> str:
    """E.g. ``503 SlowDown``; the status alone when the answer had no error code (a HEAD request's)."""
    return f"{status} {code}" if code and code != str(status) else str(status)


def _describe(error: BaseException) -> str:
    """The last error of a call, one line: ``503 SlowDown: Please reduce your request rate.``."""
    cause = error.__cause__ if isinstance(error.__cause__, ClientError) else None
    if cause is not None:
        status = cause.response.get("ResponseMetadata", {}).get("HTTPStatusCode", 0)
        details = cause.response.get("Error", {})
        return f"{_status(status, details.get('Code', ''))}: {details.get('Message', '')}"
    return f"{type(error).__name__}: {error}"


class RetryingS3FileSystem(S3FileSystem):
    """s3fs whose API calls count their retries and end, when every attempt failed with a transient error,
    in ``StoreUnreachable``."""

    retries = TRIES

    async def set_session(self, refresh: bool = False, kwargs: dict | None = None) -> Any:
        client = await super().set_session(refresh=refresh, kwargs=kwargs or {})
        # unique ids: registering again (every call passes here) changes nothing
        client.meta.events.register("request-created.s3", _attempt_starting, unique_id="webshards-attempts")
        client.meta.events.register("needs-retry.s3", _attempt_ended, unique_id="webshards-failures")
        return client

    async def _call_s3(self, method: str, *akwarglist: Any, **kwargs: Any) -> Any:
        call = _Call(f"s3://{kwargs.get('Bucket', '')}/{kwargs.get('Key', kwargs.get('Prefix', ''))}")
        token, start = _CALL.set(call), time.monotonic()
        try:
            return await super()._call_s3(method, *akwarglist, **kwargs)
        except Exception as error:
            if not _transient(error):
                raise
            seconds = time.monotonic() - start
            raise StoreUnreachable(call.where, max(call.attempts, 1), seconds, _describe(error)) from error
        finally:
            _CALL.reset(token)


def s3_filesystem(url: str) -> tuple[RetryingS3FileSystem, str]:
    """The filesystem of an ``s3://`` URL (built from the environment's settings) and the path in it."""
    fs = RetryingS3FileSystem(**S3Settings.from_env().options())
    return fs, fs._strip_protocol(url)
