"""API keys and owners without a server (the HTTP side is in test_security.py)."""

from __future__ import annotations

import logging

import pytest

from deployments.auth import Access, owner_of
from deployments.errors import Forbidden, Unauthorized
from pipeline.config import Settings


def access(**settings) -> Access:
    return Access.from_settings(Settings(**settings))


def test_keys_from_the_setting_and_a_file(tmp_path):
    keys_file = tmp_path / "keys"
    keys_file.write_text("from-file-1\n\n  from-file-2  \n")
    gate = access(api_keys=" env-1 , env-2,", api_keys_file=keys_file)
    for key in ("env-1", "env-2", "from-file-1", "from-file-2"):
        assert gate.owner(f"Bearer {key}", "203.0.113.9") == owner_of(key)
    assert len({owner_of(k) for k in ("env-1", "env-2", "from-file-1")}) == 3


@pytest.mark.parametrize(
    "header", [None, "", "Bearer", "Bearer ", "Basic env-1", "Bearer env-", "Bearer env-1x", "bearer nope"]
)
def test_anything_but_a_known_key_is_unauthorized(header):
    with pytest.raises(Unauthorized):
        access(api_keys="env-1").owner(header, "127.0.0.1")


def test_the_owner_is_a_digest_not_the_key():
    owner = access(api_keys="a-secret-key").owner("Bearer a-secret-key", None)
    assert "a-secret-key" not in owner and len(owner) == 24
    assert access(api_keys="a-secret-key").owner("bearer a-secret-key", None) == owner  # scheme is case-blind


def test_without_keys_only_loopback_is_served(caplog):
    with caplog.at_level(logging.WARNING, logger="deployments.auth"):
        gate = access()
    assert "no API keys" in caplog.text
    assert gate.owner(None, "127.0.0.1") == gate.owner(None, "::1") == ""
    for remote in ("10.1.2.3", "203.0.113.9", "2001:db8::1", None, "not-an-address"):
        with pytest.raises(Forbidden):
            gate.owner(None, remote)


def test_anonymous_remote_is_an_explicit_setting():
    gate = access(server={"anonymous_remote": True})
    assert gate.owner(None, "203.0.113.9") == ""


def test_open_paths_are_configurable():
    assert access().is_open("/health") and access().is_open("/docs")
    closed = access(server={"open_paths": ["/health"]})
    assert closed.is_open("/health") and not closed.is_open("/docs") and not closed.is_open("/openapi.json")
