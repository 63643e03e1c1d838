"""API keys, owners and the result-size limit without a server (the HTTP side is in test_security.py)."""

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
    assert gate.owner(None, "127.0.0.1", "localhost:8080") == gate.owner(None, "::1", "[::1]:8080") == ""
    for remote in ("10.1.2.3", "203.0.113.9", "2001:db8::1", None, "not-an-address"):
        with pytest.raises(Forbidden):
            gate.owner(None, remote, "localhost:8080")


@pytest.mark.parametrize(
    ("host", "origin"),
    [
        ("evil.example:8080", None),  # a page's own name rebound to 127.0.0.1
        ("127.0.0.1.nip.io:8080", None),
        (None, None),
        ("localhost:8080", "https://evil.example"),  # a cross-site form post
        ("127.0.0.1:8080", "null"),  # a sandboxed page
    ],
)
def test_without_keys_browsers_on_other_sites_are_refused(host, origin):
    with pytest.raises(Forbidden):
        access().owner(None, "127.0.0.1", host, origin)


def test_without_keys_loopback_names_and_origins_pass():
    gate = access()
    for host in ("localhost:8080", "127.0.0.1:8080", "[::1]:8080", "localhost"):
        assert gate.owner(None, "127.0.0.1", host, None) == ""
    assert gate.owner(None, "127.0.0.1", "localhost:8080", "http://localhost:8080") == ""


def test_anonymous_remote_is_an_explicit_setting():
    gate = access(server={"anonymous_remote": True})
    assert gate.owner(None, "203.0.113.9", "analyzer.internal:8080") == ""
    with pytest.raises(Forbidden):  # still no cross-site posts
        gate.owner(None, "203.0.113.9", "analyzer.internal:8080", "https://evil.example")


def test_open_paths_are_configurable():
    assert access().is_open("/health") and access().is_open("/docs")
    closed = access(server={"open_paths": ["/health"]})
    assert closed.is_open("/health") and not closed.is_open("/docs") and not closed.is_open("/openapi.json")


def test_open_paths_with_a_trailing_star_are_prefixes():
    gate = access()  # the default opens the web page: "/" and "/static/*"
    assert gate.is_open("/") and gate.is_open("/static/app.js") and gate.is_open("/static/")
    for closed in ("/jobs/x", "/static", "/staticx/app.js", "/x/static/app.js", "/static/../jobs/x", "/static/a/../b"):
        assert not gate.is_open(closed), closed
    exact = access(server={"open_paths": ["/static*x"]})  # a star inside a path is a character, not a wildcard
    assert exact.is_open("/static*x") and not exact.is_open("/staticAx")
    assert not access(server={"open_paths": ["/health"]}).is_open("/")


def test_results_larger_than_the_store_keeps_are_refused():
    from deployments.bodies import check_result_size
    from pipeline.errors import FileTooLarge
    from pipeline.schemas import AnalysisResult, Metadata

    meta = Metadata(processing_time=0.1, model_versions={})
    result = AnalysisResult(segments=[], speakers={}, text="word " * 1000, language="en", duration=1.0, metadata=meta)
    check_result_size(result, 10_000)
    with pytest.raises(FileTooLarge, match="bytes of JSON"):
        check_result_size(result, 4_000)
