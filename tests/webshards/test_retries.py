"""Storage retries: the S3 client's settings from the environment, http(s) shards retried and counted the
way s3 requests are, a missing file never retried, and a store that stays down one line."""

from __future__ import annotations

import logging
import time

import pytest
from fault_proxy import FaultProxy
from helpers import serve_files

from webshards import retries
from webshards.retries import StoreUnreachable
from webshards.s3 import S3Settings
from webshards.urls import open_url


def test_s3_settings_default_to_standard_retries_and_read_the_environment(monkeypatch):
    for name in (
        "AWS_RETRY_MODE",
        "AWS_MAX_ATTEMPTS",
        "WEBSHARDS_S3_CONNECT_TIMEOUT",
        "WEBSHARDS_S3_READ_TIMEOUT",
    ):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://127.0.0.1:9000")
    assert S3Settings.from_env().options() == {
        "client_kwargs": {"endpoint_url": "http://127.0.0.1:9000"},
        "config_kwargs": {
            "retries": {"mode": "standard", "total_max_attempts": 5},
            "connect_timeout": 5.0,
            "read_timeout": 15.0,
        },
    }
    monkeypatch.setenv("AWS_RETRY_MODE", "adaptive")
    monkeypatch.setenv("AWS_MAX_ATTEMPTS", "10")
    monkeypatch.setenv("WEBSHARDS_S3_READ_TIMEOUT", "60")
    config = S3Settings.from_env().options()["config_kwargs"]
    assert (
        config["retries"] == {"mode": "adaptive", "total_max_attempts": 10} and config["read_timeout"] == 60
    )


@pytest.mark.parametrize(
    ("name", "value", "message"),
    [
        ("AWS_MAX_ATTEMPTS", "0", "AWS_MAX_ATTEMPTS must be at least 1"),
        ("AWS_MAX_ATTEMPTS", "many", "invalid literal"),
        ("AWS_RETRY_MODE", "eager", "AWS_RETRY_MODE must be standard, adaptive or legacy"),
        ("WEBSHARDS_S3_CONNECT_TIMEOUT", "-1", "WEBSHARDS_S3_CONNECT_TIMEOUT must be positive"),
    ],
)
def test_a_bad_s3_setting_is_a_value_error_naming_it(monkeypatch, name, value, message):
    monkeypatch.setenv(name, value)
    with pytest.raises(ValueError, match=message):
        S3Settings.from_env()


@pytest.fixture(scope="module")
def http_root():
    with serve_files({"a.tar": b"shard bytes" * 100}) as url:
        yield url


def test_an_http_shard_is_retried_counted_and_then_one_line(http_root, caplog):
    caplog.set_level(logging.DEBUG, logger="webshards")
    with FaultProxy(http_root, fraction=1.0, faults=("slowdown",), max_in_a_row=None) as down:
        counted, start = retries.retries_so_far(), time.monotonic()
        with pytest.raises(StoreUnreachable) as caught:
            open_url(f"{down.url}/a.tar", retries=2, backoff=0.01)
    assert time.monotonic() - start < 10 and retries.retries_so_far() - counted == 2
    assert str(caught.value).startswith(f"{down.url}/a.tar: unreachable after 3 attempts over ")
    assert "(last: ClientResponseError: 503" in str(caught.value) and "\n" not in str(caught.value)


def test_a_missing_http_shard_is_not_retried(http_root):
    counted = retries.retries_so_far()
    with pytest.raises(FileNotFoundError):
        open_url(f"{http_root}/missing.tar", retries=3, backoff=1.0)
    assert retries.retries_so_far() == counted


def test_retries_are_logged_on_the_first_and_every_hundredth(monkeypatch, caplog):
    monkeypatch.setattr(retries, "_count", 0)
    with caplog.at_level(logging.WARNING, logger="webshards"):
        for i in range(250):
            retries.count_retry(f"s3://bucket/k{i}, attempt 2 after 503 SlowDown")
    lines = [r.getMessage() for r in caplog.records if "retried so far" in r.getMessage()]
    assert [line.split(" request")[0] for line in lines] == ["storage: 1", "storage: 100", "storage: 200"]
    assert lines[1].endswith("(latest: s3://bucket/k99, attempt 2 after 503 SlowDown)")
