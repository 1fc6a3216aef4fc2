"""redact_url: credentials inside URLs never reach logs or saved configs."""

from __future__ import annotations

import pytest

from webshards.urls import redact_url


@pytest.mark.parametrize(
    "text, shown",
    [
        ("s3://bucket/data/{00000..00009}.tar", "s3://bucket/data/{00000..00009}.tar"),
        ("/local/path/x.tar", "/local/path/x.tar"),
        ("https://user:hunter2@host/a?sig=ab%2Fc&se=2030", "https://user:***@host/a?sig=***&se=***"),
        ("https://ghp_TOKEN@host/repo", "https://***@host/repo"),
        ("sftp://u:pw@h/p::https://h/x?token=T0K", "sftp://u:***@h/p::https://h/x?token=***"),
        ("opening 'https://a:b@c/d' failed: 403", "opening 'https://a:***@c/d' failed: 403"),
        ("pipe:curl -s https://u:p@h/x", "pipe:curl -s https://u:***@h/x"),
    ],
)
def test_credentials_are_starred(text, shown):
    assert redact_url(text) == shown
