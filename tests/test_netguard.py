"""SSRF-safe outbound HTTP (pipeline/netguard.py) against real HTTP(S) servers on loopback.

Nothing here needs the internet: public addresses are only fed to the address check,
and names that must resolve to public addresses use a fake resolver.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime
import http.server
import logging
import socket
import ssl
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx
import pytest

from pipeline.config import NetworkSettings
from pipeline.errors import DownloadFailed, FileTooLarge, InputError
from pipeline.netguard import (
    AddressRefused,
    NetworkPolicy,
    check_url,
    check_url_async,
    download,
    is_public_address,
    post,
    redact_url,
)

BODY = b"0123456789" * 100  # 1000 bytes
DEFAULT = NetworkPolicy()
LOOPBACK = NetworkPolicy.from_entries(["127.0.0.1"])

Route = Callable[[http.server.BaseHTTPRequestHandler], None]


# --- servers ----------------------------------------------------------------------------------


class _Handler(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def do_GET(self) -> None:  # noqa: N802 (http.server's naming)
        self._dispatch()

    def do_POST(self) -> None:  # noqa: N802
        self._dispatch()

    def _dispatch(self) -> None:
        length = int(self.headers.get("Content-Length") or 0)
        body = self.rfile.read(length) if length else b""
        self.server.seen.append((self.command, self.path, dict(self.headers), body))  # type: ignore[attr-defined]
        route = self.server.routes.get(self.path.split("?")[0], _not_found)  # type: ignore[attr-defined]
        with contextlib.suppress(BrokenPipeError, ConnectionResetError):  # the client gave up, as some tests intend
            route(self)

    def log_message(self, format: str, *args: object) -> None:  # noqa: A002
        pass


class _Server(http.server.ThreadingHTTPServer):
    daemon_threads = True
    block_on_close = False


@contextmanager
def serve(routes: dict[str, Route], host: str = "127.0.0.1", port: int = 0, tls: ssl.SSLContext | None = None):
    server = _Server((host, port), _Handler)
    server.routes = routes  # type: ignore[attr-defined]
    server.seen = []  # type: ignore[attr-defined]
    if tls is not None:
        server.socket = tls.wrap_socket(server.socket, server_side=True)
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    try:
        yield server
    finally:
        server.shutdown()
        server.server_close()


def base(server: _Server, name: str | None = None) -> str:
    host, port = server.server_address[:2]
    return f"http://{name or host}:{port}"


def _reply(handler: http.server.BaseHTTPRequestHandler, status: int, body: bytes = b"", **headers: str) -> None:
    handler.send_response(status)
    handler.send_header("Connection", "close")
    for key, value in headers.items():
        handler.send_header(key.replace("_", "-"), value)
    if "Content_Length" not in headers:
        handler.send_header("Content-Length", str(len(body)))
    handler.end_headers()
    handler.wfile.write(body)


def _not_found(h: http.server.BaseHTTPRequestHandler) -> None:
    _reply(h, 404, b"no such thing")


def _file(h: http.server.BaseHTTPRequestHandler) -> None:
    _reply(h, 200, BODY)


def _error(h: http.server.BaseHTTPRequestHandler) -> None:
    _reply(h, 500, b"internal detail: db at 10.0.0.7")


def _redirect(location: str) -> Route:
    return lambda h: _reply(h, 302, Location=location)


def _chunked(size: int) -> Route:
    def route(h: http.server.BaseHTTPRequestHandler) -> None:
        h.send_response(200)
        h.send_header("Transfer-Encoding", "chunked")
        h.send_header("Connection", "close")
        h.end_headers()
        for _ in range(size // 500):
            h.wfile.write(b"1f4\r\n" + b"x" * 500 + b"\r\n")
        h.wfile.write(b"0\r\n\r\n")

    return route


def _drip(h: http.server.BaseHTTPRequestHandler) -> None:
    """A byte every 0.2 s: each read is quick, the whole never ends in time."""
    h.send_response(200)
    h.send_header("Content-Length", "100")
    h.send_header("Connection", "close")
    h.end_headers()
    for _ in range(100):
        h.wfile.write(b"x")
        h.wfile.flush()
        time.sleep(0.2)


def _stall(h: http.server.BaseHTTPRequestHandler) -> None:
    h.send_response(200)
    h.send_header("Content-Length", "100")
    h.end_headers()
    h.wfile.flush()
    time.sleep(5)


ROUTES: dict[str, Route] = {
    "/file": _file,
    "/error": _error,
    "/big": lambda h: _reply(h, 200, b"x" * 5000),
    "/chunked": _chunked(5000),
    "/drip": _drip,
    "/stall": _stall,
    "/loop": _redirect("/loop"),
    "/relative": _redirect("file?sig=2"),
    "/to-ftp": _redirect("ftp://127.0.0.1/file"),
}


@pytest.fixture
def server() -> Iterator[_Server]:
    with serve(ROUTES) as s:
        yield s


def fetch(url: str, tmp_path: Path, policy: NetworkPolicy = LOOPBACK, **kwargs: float) -> Path:
    target = tmp_path / "out.bin"
    options = {"max_bytes": 10_000, "deadline_s": 5.0, "read_timeout_s": 2.0, "max_redirects": 3} | kwargs
    download(url, target, policy=policy, **options)  # type: ignore[arg-type]
    return target


def refused(url: str) -> str:
    return f"could not download {redact_url(url)}"


# --- downloads ----------------------------------------------------------------------------------


def test_allowed_loopback_downloads(server: _Server, tmp_path: Path) -> None:
    assert fetch(f"{base(server)}/file?sig=1", tmp_path).read_bytes() == BODY
    headers = server.seen[0][2]
    assert headers["Host"] == f"127.0.0.1:{server.server_address[1]}"


def test_default_policy_refuses_loopback_before_connecting(server: _Server, tmp_path: Path) -> None:
    url = f"{base(server)}/file"
    with pytest.raises(DownloadFailed) as info:
        fetch(url, tmp_path, DEFAULT)
    assert str(info.value) == refused(url)
    assert server.seen == []
    assert not (tmp_path / "out.bin").exists()


def test_same_message_for_404_500_and_refused(server: _Server, tmp_path: Path) -> None:
    url_for = {"/missing": f"{base(server)}/missing", "/error": f"{base(server)}/error"}
    outcomes = []
    for url, policy in ((url_for["/missing"], DEFAULT), (url_for["/missing"], LOOPBACK)):
        with pytest.raises(DownloadFailed) as info:
            fetch(url, tmp_path, policy)
        outcomes.append(str(info.value))
    assert outcomes[0] == outcomes[1] == refused(url_for["/missing"])
    with pytest.raises(DownloadFailed) as info:
        fetch(url_for["/error"], tmp_path)
    assert str(info.value) == refused(url_for["/error"])
    assert "500" not in str(info.value) and "10.0.0.7" not in str(info.value)
    assert info.value.__cause__ is None and info.value.__suppress_context__


def test_query_strings_stay_out_of_messages_and_logs(
    server: _Server, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG, logger="pipeline.netguard")
    for policy in (DEFAULT, LOOPBACK):
        with pytest.raises(DownloadFailed) as info:
            fetch(f"http://user:pw@127.0.0.1:{server.server_address[1]}/missing?sig=SECRET", tmp_path, policy)
        assert "SECRET" not in str(info.value) and "pw" not in str(info.value)
    netguard_logs = [r.getMessage() for r in caplog.records if r.name == "pipeline.netguard"]
    assert len(netguard_logs) == 2
    assert not any("SECRET" in m or "pw@" in m for m in netguard_logs)


def test_relative_redirect_is_followed(server: _Server, tmp_path: Path) -> None:
    assert fetch(f"{base(server)}/relative", tmp_path).read_bytes() == BODY
    assert [path for _, path, _, _ in server.seen] == ["/relative", "/file?sig=2"]


def test_redirect_to_a_refused_address_is_refused(tmp_path: Path) -> None:
    with serve({"/file": _file}) as inner:
        routes = {"/hop": _redirect(f"{base(inner)}/file")}
        with serve(routes, host="127.0.0.2") as outer:
            only_outer = NetworkPolicy.from_entries(["127.0.0.2/32"])
            url = f"{base(outer)}/hop"
            with pytest.raises(DownloadFailed) as info:
                fetch(url, tmp_path, only_outer)
            assert str(info.value) == refused(url)
            assert len(outer.seen) == 1 and inner.seen == []
            # Both allowed: the same redirect goes through.
            both = NetworkPolicy.from_entries(["127.0.0.2/32", "127.0.0.1"])
            assert fetch(url, tmp_path, both).read_bytes() == BODY


def test_redirect_loop_stops_after_max_hops(server: _Server, tmp_path: Path) -> None:
    url = f"{base(server)}/loop"
    with pytest.raises(DownloadFailed) as info:
        fetch(url, tmp_path, max_redirects=3)
    assert str(info.value) == refused(url)
    assert len(server.seen) == 4  # the first request and three redirects


def test_no_redirects_allowed(server: _Server, tmp_path: Path) -> None:
    with pytest.raises(DownloadFailed):
        fetch(f"{base(server)}/relative", tmp_path, max_redirects=0)
    assert len(server.seen) == 1


def test_redirect_to_another_scheme_is_refused(server: _Server, tmp_path: Path) -> None:
    with pytest.raises(DownloadFailed):
        fetch(f"{base(server)}/to-ftp", tmp_path)


@pytest.mark.parametrize("path", ["/big", "/chunked"])
def test_size_cap(server: _Server, tmp_path: Path, path: str) -> None:
    with pytest.raises(FileTooLarge) as info:
        fetch(f"{base(server)}{path}?sig=SECRET", tmp_path, max_bytes=1000)
    assert "SECRET" not in str(info.value)
    assert not (tmp_path / "out.bin").exists()


def test_size_cap_is_inclusive(server: _Server, tmp_path: Path) -> None:
    assert fetch(f"{base(server)}/file", tmp_path, max_bytes=len(BODY)).stat().st_size == len(BODY)


@pytest.mark.parametrize("path", ["/drip", "/stall"])
def test_total_deadline(server: _Server, tmp_path: Path, path: str) -> None:
    url = f"{base(server)}{path}"
    start = time.monotonic()
    with pytest.raises(DownloadFailed) as info:
        fetch(url, tmp_path, deadline_s=1.5, read_timeout_s=1.0)
    elapsed = time.monotonic() - start
    assert str(info.value) == refused(url)
    assert elapsed < 4.0
    assert not (tmp_path / "out.bin").exists()


def test_pinned_address_survives_dns_rebinding(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """The checked address is the one connected to: a second answer from DNS is never asked for."""
    with serve({"/file": _file}, host="127.0.0.2") as good:
        port = good.server_address[1]
        with serve({"/file": lambda h: _reply(h, 200, b"evil")}, port=port) as evil:
            answers = iter(["127.0.0.2"])
            lookups = _fake_dns(monkeypatch, lambda: next(answers, "127.0.0.1"), name="rebind.test")
            policy = NetworkPolicy.from_entries(["127.0.0.2/32"])
            assert fetch(f"http://rebind.test:{port}/file", tmp_path, policy).read_bytes() == BODY
            assert lookups == ["rebind.test"] and evil.seen == []
            assert good.seen[0][2]["Host"] == f"rebind.test:{port}"


def _fake_dns(monkeypatch: pytest.MonkeyPatch, answer: Callable[[], str], name: str) -> list[str]:
    """Make `name` resolve to answer(); other names go to the real resolver. Returns the lookups of `name`."""
    real = socket.getaddrinfo
    lookups: list[str] = []

    def fake(host, port, *args, **kwargs):  # noqa: ANN001, ANN202
        if host != name:
            return real(host, port, *args, **kwargs)
        lookups.append(host)
        addresses = answer().split(",")
        return [
            (socket.AF_INET6 if ":" in a else socket.AF_INET, socket.SOCK_STREAM, 6, "", (a, port)) for a in addresses
        ]

    monkeypatch.setattr(socket, "getaddrinfo", fake)
    return lookups


LOOPBACK_AND_PRIVATE_SPELLINGS = [
    "2130706433",
    "0177.0.0.1",
    "0x7f.1",
    "0x7f000001",
    "127.1",
    "127.0.0.1",
    "[::1]",
    "[::ffff:127.0.0.1]",
    "[::ffff:7f00:1]",
    "[::127.0.0.1]",
    "[64:ff9b::7f00:1]",
    "[64:ff9b:1::a00:1]",
    "[2002:7f00:1::]",
    "[2001::1]",
    "169.254.169.254",
    "[::ffff:169.254.169.254]",
    "10.0.0.1",
    "192.168.1.1",
    "172.16.0.1",
    "100.64.0.1",
    "0.0.0.0",
    "0",
    "[::]",
    "224.0.0.1",
    "255.255.255.255",
    "[fe80::1]",
    "[fc00::1]",
    "[fd00::1]",
    "[fec0::1]",
    "[ff02::1]",
    "198.18.0.1",
    "192.0.2.1",
    "[2001:db8::1]",
]


@pytest.mark.parametrize("host", LOOPBACK_AND_PRIVATE_SPELLINGS)
def test_address_spellings_are_refused(host: str, monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setattr(httpx.Client, "send", _must_not_connect)
    url = f"http://{host}:8080/x?token=1"
    with pytest.raises(DownloadFailed) as info:
        fetch(url, tmp_path, DEFAULT)
    assert str(info.value) == refused(url)
    with pytest.raises(InputError):
        check_url(url, DEFAULT)


def _must_not_connect(*args: object, **kwargs: object) -> None:
    raise AssertionError("a refused address was connected to")


@pytest.mark.parametrize(
    "address",
    [a.strip("[]") for a in LOOPBACK_AND_PRIVATE_SPELLINGS if not a.isdigit() and "0x" not in a and a != "127.1"]
    + ["0177.0.0.1", "not an address", "64:ff9b::a00:1", "2002:a00:1::", "240.0.0.1", "100.127.255.254", "192.0.0.9"],
)
def test_non_public_addresses(address: str) -> None:
    assert not is_public_address(address)


@pytest.mark.parametrize(
    "address",
    ["8.8.8.8", "1.1.1.1", "2606:4700:4700::1111", "::ffff:8.8.8.8", "64:ff9b::808:808", "2002:808:808::1"],
)
def test_public_addresses(address: str) -> None:
    assert is_public_address(address)


def test_allow_list_entries() -> None:
    policy = NetworkPolicy.from_settings(
        NetworkSettings(allowed_hosts=["10.0.0.0/8", "LocalHost.", "[fd00::1]", "192.168.1.7"])
    )
    assert policy.allows_address("10.20.30.40") and policy.allows_address("::ffff:10.0.0.1")
    assert policy.allows_address("fd00::1") and not policy.allows_address("fd00::2")
    assert policy.allows_address("192.168.1.7") and not policy.allows_address("192.168.1.8")
    assert not policy.allows_address("127.0.0.1")
    assert policy.allows_name("localhost") and policy.allows_name("LOCALHOST.")
    assert not policy.allows_name("localhost.localdomain")
    assert policy.allows_address("8.8.8.8")


def test_any_bad_address_refuses_the_name(monkeypatch: pytest.MonkeyPatch) -> None:
    answer = "8.8.8.8"
    _fake_dns(monkeypatch, lambda: answer, name="mixed.test")
    check_url("https://mixed.test/hook", DEFAULT)
    answer = "8.8.8.8,10.0.0.1"
    with pytest.raises(InputError):
        check_url("https://mixed.test/hook", DEFAULT)
    # Allowed by name: whatever it resolves to.
    check_url("https://MIXED.test/hook", NetworkPolicy.from_entries(["mixed.test"]))


@pytest.mark.parametrize(
    "url",
    [
        "http://[::1",
        "ftp://x/",
        "file:///etc/passwd",
        "http:///x",
        "http://",
        "",
        "javascript:alert(1)",
        "http://127.0.0.1:99999/",
        "http://127.0.0.1:0/",
        "http://[fe80::1%25lo]/",
        "http://" + "a" * 200_000 + "/",
        "http://127.0.0.1/" + "a" * 200_000,
        "http://" + "a" * 300 + "/",  # a DNS label too long: the resolver's UnicodeError
        "http://a\x00b/",
        "http://exa mple.com/",
        "http://%6c%6fcalhost/",
        "http://\u0000/",
    ],
)
def test_malformed_urls_fail_cleanly(url: str, tmp_path: Path) -> None:
    with pytest.raises(DownloadFailed) as info:
        fetch(url, tmp_path, LOOPBACK)
    assert str(info.value).startswith("could not download ")
    assert len(str(info.value)) < 300
    with pytest.raises(InputError):
        check_url(url, LOOPBACK)
    with pytest.raises(AddressRefused):
        asyncio.run(post(httpx.AsyncClient(), url, content=b"", headers={}, policy=LOOPBACK, timeout=2.0))


def test_redact_url() -> None:
    assert redact_url("https://u:p@Host.example:8443/a/b?sig=1#frag") == "https://host.example/a/b"
    assert redact_url("http://[::1") == "<invalid URL>"
    assert redact_url("http://[::1]:80/x?q") == "http://[::1]/x"
    assert len(redact_url("http://x/" + "a" * 10_000)) < 300


# --- callbacks --------------------------------------------------------------------------------


def _hook(h: http.server.BaseHTTPRequestHandler) -> None:
    _reply(h, 204)


async def _post(url: str, policy: NetworkPolicy, client: httpx.AsyncClient | None = None) -> httpx.Response:
    async with client or httpx.AsyncClient(trust_env=False) as c:
        return await post(
            c, url, content=b'{"ok":true}', headers={"Content-Type": "application/json"}, policy=policy, timeout=3.0
        )


def test_post_pins_the_address_and_keeps_the_host_header(monkeypatch: pytest.MonkeyPatch) -> None:
    with serve({"/hook": _hook, "/moved": _redirect("/hook")}) as receiver:
        port = receiver.server_address[1]
        lookups = _fake_dns(monkeypatch, lambda: "127.0.0.1", name="hooks.test")
        policy = NetworkPolicy.from_entries(["hooks.test"])
        response = asyncio.run(_post(f"http://hooks.test:{port}/hook?sig=1", policy))
        assert response.status_code == 204
        method, path, headers, body = receiver.seen[0]
        assert (method, path, body) == ("POST", "/hook?sig=1", b'{"ok":true}')
        assert headers["Host"] == f"hooks.test:{port}"
        assert headers["Content-Type"] == "application/json"
        assert lookups == ["hooks.test"]
        # Redirects come back as they are.
        assert asyncio.run(_post(f"http://hooks.test:{port}/moved", policy)).status_code == 302
        assert len(receiver.seen) == 2


def _endless(h: http.server.BaseHTTPRequestHandler) -> None:
    """A 200 whose body never ends: a receiver trying to exhaust the sender's memory."""
    h.send_response(200)
    h.send_header("Transfer-Encoding", "chunked")
    h.end_headers()
    try:
        for _ in range(100_000):
            h.wfile.write(b"ffff\r\n" + b"x" * 0xFFFF + b"\r\n")
    except OSError:  # the sender hung up, as it should
        pass


def _silent(h: http.server.BaseHTTPRequestHandler) -> None:
    time.sleep(6)  # not even a status line


def test_post_never_reads_the_answer_and_has_one_deadline() -> None:
    with serve({"/endless": _endless, "/silent": _silent}) as receiver:
        t0 = time.monotonic()
        assert asyncio.run(_post(f"{base(receiver)}/endless", LOOPBACK)).status_code == 200
        assert time.monotonic() - t0 < 2  # status and headers only
        t0 = time.monotonic()
        with pytest.raises(httpx.TimeoutException):  # retried by the caller like any timeout
            asyncio.run(_post(f"{base(receiver)}/silent", LOOPBACK))
        assert time.monotonic() - t0 < 5  # the 3 s deadline, not the server's 6 s


def test_post_to_a_refused_address() -> None:
    with serve({"/hook": _hook}) as receiver:
        with pytest.raises(AddressRefused) as info:
            asyncio.run(_post(f"{base(receiver)}/hook?sig=SECRET", DEFAULT))
        assert "SECRET" not in str(info.value)
        assert receiver.seen == []


def test_post_dns_failure_is_a_retryable_httpx_error(monkeypatch: pytest.MonkeyPatch) -> None:
    def fail() -> str:
        raise socket.gaierror(socket.EAI_NONAME, "Name or service not known")

    _fake_dns(monkeypatch, fail, name="nowhere.test")
    with pytest.raises(httpx.ConnectError):
        asyncio.run(_post("https://nowhere.test/hook", DEFAULT))


def test_check_url() -> None:
    with pytest.raises(InputError) as info:
        check_url("http://127.0.0.1:9/hook", DEFAULT)
    assert str(info.value) == "callback_url must be a public http(s) URL"
    with pytest.raises(InputError):
        asyncio.run(check_url_async("http://[::1]:9/hook", DEFAULT))
    check_url("http://127.0.0.1:9/hook", LOOPBACK)
    asyncio.run(check_url_async("http://127.0.0.1:9/hook", LOOPBACK))


# --- TLS: SNI and certificate checks use the name, the connection uses the address -------------


@pytest.fixture(scope="module")
def tls(tmp_path_factory: pytest.TempPathFactory) -> tuple[ssl.SSLContext, ssl.SSLContext, list[str | None]]:
    """A server context with a certificate for `hooks.test` only, a client context trusting it,
    and the list of SNI names the server saw."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "hooks.test")])
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(hours=1))
        .not_valid_after(now + datetime.timedelta(hours=1))
        .add_extension(x509.SubjectAlternativeName([x509.DNSName("hooks.test")]), critical=False)
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    folder = tmp_path_factory.mktemp("tls")
    (folder / "cert.pem").write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    (folder / "key.pem").write_bytes(
        key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    )
    seen_sni: list[str | None] = []
    server_ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    server_ctx.load_cert_chain(folder / "cert.pem", folder / "key.pem")
    server_ctx.sni_callback = lambda _sock, sni, _ctx: seen_sni.append(sni)  # type: ignore[assignment]
    client_ctx = ssl.create_default_context(cafile=str(folder / "cert.pem"))
    return server_ctx, client_ctx, seen_sni


def test_https_post_uses_the_name_for_sni_and_verification(
    tls: tuple[ssl.SSLContext, ssl.SSLContext, list[str | None]], monkeypatch: pytest.MonkeyPatch
) -> None:
    server_ctx, client_ctx, seen_sni = tls
    seen_sni.clear()
    with serve({"/hook": _hook}, tls=server_ctx) as receiver:
        port = receiver.server_address[1]
        _fake_dns(monkeypatch, lambda: "127.0.0.1", name="hooks.test")
        policy = NetworkPolicy.from_entries(["hooks.test", "127.0.0.1"])
        client = httpx.AsyncClient(verify=client_ctx, trust_env=False)
        response = asyncio.run(_post(f"https://hooks.test:{port}/hook", policy, client))
        assert response.status_code == 204
        assert seen_sni == ["hooks.test"]
        assert receiver.seen[0][2]["Host"] == f"hooks.test:{port}"
        # The certificate is checked: by address, the name does not match it.
        with pytest.raises(httpx.ConnectError):
            asyncio.run(_post(f"https://127.0.0.1:{port}/hook", policy, httpx.AsyncClient(verify=client_ctx)))
        assert len(receiver.seen) == 1
