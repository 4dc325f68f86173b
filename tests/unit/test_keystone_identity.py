"""KeystoneIdentity without a Keystone: its validation cache, and the one-line errors when
Keystone is not there. (Real tokens: tests/integration/test_keystone.py.)"""

from __future__ import annotations

import datetime as dt
import json
from pathlib import Path

import attrs
import pytest

from ivcache.adapters.identity.keystone import KeystoneIdentity, token_for_cloud
from ivcache.core.errors import ConfigError, IdentityUnavailable
from ivcache.core.model import RequestContext

START = dt.datetime(2026, 12, 2, 12, 0, tzinfo=dt.UTC)


@attrs.define
class Clock:
    now: dt.datetime = START

    def __call__(self) -> dt.datetime:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += dt.timedelta(seconds=seconds)


class Counting(KeystoneIdentity):
    """Keystone's answer scripted: every token is valid until ``expires``."""

    def __init__(self, expires: dt.datetime, clock: Clock, cache_seconds: float) -> None:
        super().__init__(os_cloud="unused", cache_seconds=cache_seconds, clock=clock)
        self.expires = expires
        self.asked: list[str] = []

    def _validate(self, token: str) -> tuple[RequestContext, dt.datetime]:
        self.asked.append(token)
        return RequestContext("p", "u", auth_token=token), self.expires


def test_a_validation_is_believed_for_token_cache_seconds() -> None:
    clock = Clock()
    identity = Counting(START + dt.timedelta(hours=1), clock, cache_seconds=300)

    first = identity.context("t1")
    clock.advance(299)
    again = identity.context("t1")
    identity.context("t2")
    clock.advance(2)
    identity.context("t1")

    assert first == again and first.auth_token == "t1"
    assert identity.asked == ["t1", "t2", "t1"]


def test_a_validation_is_never_believed_past_the_tokens_own_expiry() -> None:
    clock = Clock()
    identity = Counting(START + dt.timedelta(seconds=60), clock, cache_seconds=300)

    identity.context("t")
    clock.advance(59)
    identity.context("t")
    clock.advance(2)
    identity.context("t")

    assert identity.asked == ["t", "t"]


def test_token_cache_seconds_0_asks_keystone_every_time() -> None:
    identity = Counting(START + dt.timedelta(hours=1), Clock(), cache_seconds=0)

    for _ in range(3):
        identity.context("t")

    assert identity.asked == ["t"] * 3


def _clouds(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, auth_url: str) -> None:
    path = tmp_path / "clouds.yaml"
    path.write_text(json.dumps({"clouds": {"dead": {"auth": {
        "auth_url": auth_url, "username": "ivcache", "password": "pw",
        "user_domain_id": "default", "project_name": "service",
        "project_domain_id": "default"}}}}))
    monkeypatch.setenv("OS_CLIENT_CONFIG_FILE", str(path))


def test_an_unreachable_keystone_is_one_line_naming_its_url(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    _clouds(tmp_path, monkeypatch, "http://127.0.0.1:9/v3")

    with pytest.raises(IdentityUnavailable) as caught:
        KeystoneIdentity(os_cloud="dead").context("a-token")
    with pytest.raises(IdentityUnavailable) as logging_in:
        token_for_cloud("dead")

    for exc in (caught.value, logging_in.value):
        assert str(exc) == "Keystone at http://127.0.0.1:9/v3 is unreachable: connection refused"


def test_a_cloud_missing_from_clouds_yaml_is_a_config_error(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    _clouds(tmp_path, monkeypatch, "http://127.0.0.1:9/v3")

    with pytest.raises(ConfigError, match="'nowhere'"):
        KeystoneIdentity(os_cloud="nowhere").context("a-token")
    with pytest.raises(ConfigError, match="'nowhere'"):
        token_for_cloud("nowhere")
