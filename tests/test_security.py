"""Hostile input over real HTTP against the product (`serve run`, tests/conftest.py `server`).

Each case must get its 4xx with a JSON body, within seconds, with nothing of
any local file or internal address in the answer, and leave the server
healthy. A canary HTTP server on 127.0.0.1 stands for every internal service:
the server may never reach it, however the address is spelt. Only 127.0.0.2
is allowed (ECG_NETWORK__ALLOWED_HOSTS), for the media server of these tests.
"""

from __future__ import annotations

import re
import struct
import time

import httpx
import pytest
import schemathesis
from hypothesis import HealthCheck, given
from hypothesis import settings as hypothesis_settings

from tests.conftest import FIXTURES, UPLOAD_LIMIT, ffmpeg, fixture_path
from tests.serving import API_KEY, JOBS, OTHER_KEY, TRUSTED_HOST, Recorder

ES = fixture_path("sentence_es.flac")
FAST_S = 15.0  # every refusal must come well within this (a hang would be minutes)
# What must never appear in an answer: file contents, internal answers, internals of the server.
LEAKS = re.compile(r"root:x:0:0|canary-secret|ray_version|Traceback|/tmp/|ecg-upload|answered HTTP|\b(?:401|404|500)\b")


@pytest.fixture(scope="module")
def canary():
    server = Recorder("127.0.0.1", {"/": (200, {}, b"canary-secret"), "/a.wav": (200, {}, b"canary-secret")})
    yield server
    server.close()


@pytest.fixture(scope="module")
def media_server(canary):
    """The allowed host: a real file, redirects to places the server must not follow, errors."""
    audio = ES.read_bytes()
    server = Recorder(TRUSTED_HOST)
    server.routes.update(
        {
            "/es.flac": (200, {"content-type": "audio/flac"}, audio),
            "/to-canary": (302, {"location": canary.url("/a.wav")}, b""),
            "/to-decimal": (302, {"location": f"http://2130706433:{canary.port}/a.wav"}, b""),
            "/to-file": (302, {"location": "file:///etc/passwd"}, b""),
            "/loop": (302, {"location": "/loop"}, b""),
            "/to-es": (301, {"location": "/es.flac"}, b""),
            "/missing.wav": (404, {}, b"no such thing"),
            "/error.wav": (500, {}, b"internal trouble"),
        }
    )
    yield server
    server.close()


@pytest.fixture(scope="module")
def anonymous(server):
    with httpx.Client(base_url=server.url, timeout=60) as c:
        yield c


@pytest.fixture(scope="module")
def other(server):
    with httpx.Client(base_url=server.url, timeout=60, headers={"authorization": f"Bearer {OTHER_KEY}"}) as c:
        yield c


def refused(response: httpx.Response, status: int, code: str, started: float) -> dict:
    """The answer is the expected JSON refusal, quick, and gives nothing away."""
    assert time.monotonic() - started < FAST_S, "too slow: a refusal must be quick"
    assert response.status_code == status, response.text
    assert response.headers["content-type"].startswith("application/json")
    body = response.json()
    assert body["error"] == code and body["message"], body
    assert not LEAKS.search(response.text), response.text
    return body


def post(client: httpx.Client, path: str, **kwargs) -> tuple[httpx.Response, float]:
    started = time.monotonic()
    return client.post(path, **kwargs), started


# -- API keys and owners -------------------------------------------------------------------

NO_KEY = {
    "no header": {},
    "unknown key": {"authorization": "Bearer not-a-key-of-this-server"},
    "basic scheme": {"authorization": f"Basic {API_KEY}"},
    "empty bearer": {"authorization": "Bearer"},
    "key as a prefix": {"authorization": f"Bearer {API_KEY[:-1]}"},
}


@pytest.mark.parametrize("case", list(NO_KEY))
def test_no_valid_key_gets_401(anonymous, case):
    headers = NO_KEY[case]
    for method, path in (("POST", "/transcribe"), ("POST", JOBS), ("GET", "/jobs/some-job")):
        started = time.monotonic()
        response = anonymous.request(method, path, headers=headers, json={"audio_path": str(ES)})
        refused(response, 401, "unauthorized", started)
        assert response.headers["www-authenticate"] == "Bearer"


def test_health_and_docs_stay_open(anonymous):
    assert anonymous.get("/health").json()["status"] == "ok"
    assert anonymous.get("/docs").status_code == 200
    assert "/transcribe" in anonymous.get("/openapi.json").json()["paths"]


def test_every_other_route_needs_a_key(anonymous):
    spec = anonymous.get("/openapi.json").json()
    closed = [(m, p) for p, ops in spec["paths"].items() for m in ops if p not in ("/health",)]
    assert len(closed) >= 3
    for method, path in closed:
        response = anonymous.request(method.upper(), path.replace("{job_id}", "x"))
        assert response.status_code == 401, (method, path, response.text)


def test_a_job_belongs_to_the_key_that_created_it(client, other):
    body = {"audio_path": str(FIXTURES / "make_fixtures.py"), "job_id": "shared-id"}
    mine = client.post(JOBS, json=body)
    assert mine.status_code == 202, mine.text
    started = time.monotonic()
    refused(other.get("/jobs/shared-id"), 404, "unknown_job", started)
    # The same id from another key is that key's own new job, not a view of the first one.
    theirs = other.post(JOBS, json={**body, "audio_path": str(ES)})
    assert theirs.status_code == 202, theirs.text
    assert client.get("/jobs/shared-id").json()["source"].endswith("make_fixtures.py")
    assert other.get("/jobs/shared-id").json()["source"].endswith("sentence_es.flac")


# -- bodies --------------------------------------------------------------------------------


@pytest.mark.parametrize("content_type", ["text/plain", "application/x-www-form-urlencoded", "application/xml", ""])
def test_only_json_and_multipart_bodies(client, content_type):
    for path in ("/transcribe", JOBS):
        response, started = post(
            client, path, content=f'{{"audio_path": "{ES}"}}'.encode(), headers={"content-type": content_type}
        )
        refused(response, 415, "unsupported_media_type", started)


def test_json_body_size_is_capped(client):
    response, started = post(client, "/transcribe", json={"video_path": "x" * 200_000})
    refused(response, 413, "too_large", started)

    def chunks():  # no content-length: the cap holds while reading
        yield b'{"video_path": "'
        for _ in range(100):
            yield b"y" * 10_000
        yield b'"}'

    response, started = post(client, JOBS, content=chunks(), headers={"content-type": "application/json"})
    refused(response, 413, "too_large", started)


BAD_FIELDS = {
    "5,000-character path": {"audio_path": "/" + "a" * 5000},
    "long job id": {"job_id": "j" * 200},
    "long language": {"language": "e" * 100},
    "num_speakers 0": {"num_speakers": 0},
    "num_speakers -3": {"num_speakers": -3},
    "huge num_speakers": {"num_speakers": 10**30},
    "max_speakers as text": {"max_speakers": "many"},
}


@pytest.mark.parametrize("case", list(BAD_FIELDS))
def test_bad_fields_get_422(client, case):
    response, started = post(client, JOBS, json={"audio_path": str(ES), **BAD_FIELDS[case]})
    body = refused(response, 422, "invalid_input", started)
    assert next(iter(BAD_FIELDS[case])) in body["message"]  # the message names the field


def test_non_finite_number_gets_422(client):
    raw = f'{{"audio_path": "{ES}", "min_speakers": 1e400}}'.encode()
    response, started = post(client, "/transcribe", content=raw, headers={"content-type": "application/json"})
    refused(response, 422, "invalid_input", started)


def test_oversize_upload_is_refused_while_reading(client, server):
    junk = b"\0" * (UPLOAD_LIMIT + 1024 * 1024)
    response, started = post(client, JOBS, files={"file": ("big.wav", junk, "audio/wav")})
    refused(response, 413, "too_large", started)

    def stream():  # chunked: no length to refuse up front
        yield (
            b'--b\r\ncontent-disposition: form-data; name="file"; filename="big.wav"\r\ncontent-type: audio/wav\r\n\r\n'
        )
        for _ in range(UPLOAD_LIMIT // 65536 + 40):
            yield b"\1" * 65536
        yield b"\r\n--b--\r\n"

    headers = {"content-type": "multipart/form-data; boundary=b"}
    response, started = post(client, JOBS, content=stream(), headers=headers)
    refused(response, 413, "too_large", started)
    spool = server.workdir / "uploads"
    assert not spool.exists() or not any(spool.iterdir()), "a refused upload was left on disk"


MALFORMED_FORMS = {
    "no file field": ({"data": {"language": "en"}, "files": {"other": ("a.txt", b"x", "text/plain")}}, 400),
    "two files": ({"files": [("file", ("a.wav", b"x", "audio/wav")), ("file", ("b.wav", b"y", "audio/wav"))]}, 400),
}


@pytest.mark.parametrize("case", list(MALFORMED_FORMS))
def test_malformed_multipart_gets_400(client, case):
    kwargs, status = MALFORMED_FORMS[case]
    response, started = post(client, JOBS, **kwargs)
    refused(response, status, "invalid_input", started)


def test_broken_multipart_framing_gets_400(client):
    headers = {"content-type": "multipart/form-data; boundary=zzz"}
    response, started = post(client, JOBS, content=b"--zzz\r\nno headers at all", headers=headers)
    assert response.status_code == 400 or response.status_code == 422, response.text
    refused(response, response.status_code, "invalid_input", started)


# -- outbound requests: media URLs ---------------------------------------------------------

INTERNAL_URLS = {
    "loopback": "http://127.0.0.1:{port}/a.wav",
    "localhost": "http://localhost:{port}/a.wav",
    "decimal": "http://2130706433:{port}/a.wav",
    "octal": "http://0177.0.0.1:{port}/a.wav",
    "hex": "http://0x7f.0.0.1:{port}/a.wav",
    "short": "http://127.1:{port}/a.wav",
    "ipv6 loopback": "http://[::1]:{port}/a.wav",
    "ipv4-mapped ipv6": "http://[::ffff:127.0.0.1]:{port}/a.wav",
    "ipv4-mapped hex": "http://[::ffff:7f00:1]:{port}/a.wav",
    "nat64": "http://[64:ff9b::7f00:1]:{port}/a.wav",
    "unspecified": "http://0.0.0.0:{port}/a.wav",
    "metadata": "http://169.254.169.254/latest/meta-data/",
    "private": "http://10.0.0.1/a.wav",
    "ray dashboard": "http://127.0.0.1:8265/api/version",
    "https loopback": "https://127.0.0.1:{port}/a.wav",
    "userinfo trick": "http://example.com@127.0.0.1:{port}/a.wav",
}


@pytest.mark.parametrize("case", list(INTERNAL_URLS))
def test_internal_addresses_are_never_fetched(client, canary, case):
    url = INTERNAL_URLS[case].format(port=canary.port)
    response, started = post(client, "/transcribe", json={"video_path": url})
    refused(response, 400, "download_failed", started)
    assert canary.hits == []


REDIRECTS = ["/to-canary", "/to-decimal", "/to-file", "/loop"]


@pytest.mark.parametrize("path", REDIRECTS)
def test_redirects_are_checked_at_every_hop(client, canary, media_server, path):
    response, started = post(client, "/transcribe", json={"video_path": media_server.url(path)})
    refused(response, 400, "download_failed", started)
    assert canary.hits == []


def test_failures_and_refusals_read_the_same(client, canary, media_server):
    """404, 500 and a refused address: one error, so the answer is no oracle of what is inside."""
    messages = set()
    for url in (media_server.url("/missing.wav"), media_server.url("/error.wav"), canary.url("/a.wav")):
        response, started = post(client, "/transcribe", json={"video_path": url})
        body = refused(response, 400, "download_failed", started)
        messages.add(re.sub(r"https?://\S+", "URL", body["message"]))
    assert len(messages) == 1, messages
    assert canary.hits == []


def test_an_allowed_host_is_downloaded_through_a_redirect(client, media_server):
    response = client.post("/transcribe", json={"audio_path": media_server.url("/to-es") + "?token=s3cr3t"})
    assert response.status_code == 200, response.text
    assert response.json()["language"] == "es"
    assert "s3cr3t" not in client.get(f"/jobs/{response.headers['x-job-id']}").text


MALFORMED_URLS = ["http://[::1", "http:///a.wav", "http://", "https://exa mple.com/a.wav", "gopher://example.com/"]


@pytest.mark.parametrize("url", MALFORMED_URLS)
def test_malformed_urls_get_400(client, url):
    response, started = post(client, "/transcribe", json={"video_path": url})
    assert response.status_code == 400, response.text
    refused(response, 400, response.json()["error"], started)


# -- outbound requests: callbacks ----------------------------------------------------------

BAD_CALLBACKS = {
    "loopback": "http://127.0.0.1:{port}/hook",
    "ipv6 loopback": "http://[::1]:{port}/hook",
    "metadata": "http://169.254.169.254/hook",
    "ftp": "ftp://example.com/hook",
    "no host": "http:///hook",
}


@pytest.mark.parametrize("case", list(BAD_CALLBACKS))
def test_refused_callback_urls_are_400_at_submission(client, canary, case):
    job_id = f"cb-{case.replace(' ', '-')}"
    url = BAD_CALLBACKS[case].format(port=canary.port)
    response, started = post(client, JOBS, json={"audio_path": str(ES), "callback_url": url, "job_id": job_id})
    body = refused(response, 400, "invalid_input", started)
    assert "callback_url" in body["message"]
    assert client.get(f"/jobs/{job_id}").status_code == 404  # no job was created
    assert canary.hits == []


# -- local files ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def outside_link(media_root):
    link = media_root / "passwd.wav"
    link.symlink_to("/etc/passwd")
    return link


LOCAL_PATHS = {
    "etc passwd": "/etc/passwd",
    "missing outside": "/etc/no-such-file.wav",
    "file url": "file:///etc/passwd",
    "dot dot": f"{FIXTURES}/../../README.md",
    "symlink out": "LINK",
    "proc environ": "/proc/self/environ",
    "home": "~/.bashrc",
    "concat protocol": "concat:/etc/passwd|/etc/hosts",
}


def test_paths_outside_the_roots_get_one_403(client, outside_link):
    bodies = []
    for path in LOCAL_PATHS.values():
        path = str(outside_link) if path == "LINK" else path
        for route in ("/transcribe", JOBS):
            response, started = post(client, route, json={"audio_path": path})
            bodies.append(refused(response, 403, "path_not_allowed", started))
    # Existing and missing files, links and tricks: one answer, so nothing can be learnt from it.
    assert len({b["message"] for b in bodies}) == 1


# -- media that ffmpeg must not follow -----------------------------------------------------


@pytest.fixture(scope="module")
def hostile_media(media_root, canary):
    wav = ES.read_bytes()
    files = {
        "ended.m3u8": f"#EXTM3U\n#EXT-X-TARGETDURATION:10\n#EXTINF:10,\n{ES}\n#EXT-X-ENDLIST\n",
        "live.m3u8": f"#EXTM3U\n#EXT-X-TARGETDURATION:10\n#EXTINF:10,\n{ES}\n",
        "remote.m3u8": f"#EXTM3U\n#EXT-X-TARGETDURATION:10\n#EXTINF:10,\n{canary.url('/a.wav')}\n#EXT-X-ENDLIST\n",
        "list.ffconcat": "ffconcat version 1.0\nfile /etc/passwd\n",
        "junk.mp4": "\x00\x01garbage" * 300,
    }
    paths = {}
    for name, text in files.items():
        paths[name] = media_root / name
        paths[name].write_text(text)
    paths["truncated.flac"] = media_root / "truncated.flac"
    paths["truncated.flac"].write_bytes(wav[:2000])
    # A WAV header that claims 12 hours of 16 kHz 16-bit mono, followed by one second of data.
    claimed = 12 * 3600 * 16_000 * 2
    header = b"RIFF" + (claimed + 36).to_bytes(4, "little") + b"WAVEfmt " + (16).to_bytes(4, "little")
    header += (1).to_bytes(2, "little") + (1).to_bytes(2, "little") + (16_000).to_bytes(4, "little")
    header += (32_000).to_bytes(4, "little") + (2).to_bytes(2, "little") + (16).to_bytes(2, "little")
    paths["twelve-hours.wav"] = media_root / "twelve-hours.wav"
    paths["twelve-hours.wav"].write_bytes(header + b"data" + claimed.to_bytes(4, "little") + b"\0" * 32_000)
    # A one-second Matroska file whose Segment Info says it lasts 12 hours (Duration, in ms).
    one_second = media_root / "one-second.mka"
    ffmpeg("-f", "lavfi", "-i", "sine=f=440:d=1", "-ar", "16000", "-c:a", "pcm_s16le", str(one_second))
    data = one_second.read_bytes()
    at = data.index(b"\x44\x89\x88") + 3  # the Duration element: ID 0x4489, an 8-byte float
    paths["twelve-hours.mka"] = media_root / "twelve-hours.mka"
    paths["twelve-hours.mka"].write_bytes(data[:at] + struct.pack(">d", 12 * 3600 * 1000.0) + data[at + 8 :])
    return paths


HOSTILE = {
    "ended.m3u8": (415, "not_media"),
    "live.m3u8": (415, "not_media"),
    "remote.m3u8": (415, "not_media"),
    "list.ffconcat": (415, "not_media"),
    "junk.mp4": (415, "not_media"),
    "truncated.flac": (415, "not_media"),
    "twelve-hours.mka": (413, "too_long"),
}


@pytest.mark.parametrize("name", list(HOSTILE))
def test_hostile_media_is_refused_quickly(client, hostile_media, canary, name):
    status, code = HOSTILE[name]
    response, started = post(client, "/transcribe", json={"audio_path": str(hostile_media[name])})
    refused(response, status, code, started)
    assert canary.hits == []


def test_a_wav_header_claiming_12_hours_is_read_as_far_as_it_goes(client, hostile_media):
    """ffmpeg trusts the bytes, not the WAV header's data size: one real second is analysed."""
    response = client.post("/transcribe", json={"audio_path": str(hostile_media["twelve-hours.wav"])})
    assert response.status_code == 200, response.text
    assert response.json()["duration"] < 2


def spool_files(server) -> list:
    spool = server.workdir / "uploads"
    return list(spool.iterdir()) if spool.exists() else []


def test_uploaded_playlist_fails_its_job_and_leaves_no_file(client, server, receiver, hostile_media):
    data = hostile_media["live.m3u8"].read_bytes()
    # A name of the client's choosing that reads like a server failure must not become one.
    files = {"file": ("error while loading shared libraries.m3u8", data, "application/vnd.apple.mpegurl")}
    response = client.post(JOBS, files=files, data={"callback_url": receiver.url("/playlist")})
    assert response.status_code == 202, response.text
    final = receiver.wait_final("/playlist", timeout_s=60)[-1].body
    assert final["status"] == "failed" and final["error"]["code"] == "not_media"
    assert not LEAKS.search(final["message"])
    deadline = time.monotonic() + 10  # the spooled upload goes once the job has ended
    while spool_files(server) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert spool_files(server) == []


def test_bad_fields_of_an_upload_spool_nothing(client, server):
    files = {"file": ("a.wav", ES.read_bytes(), "audio/wav")}
    response, started = post(client, JOBS, files=files, data={"num_speakers": "0"})
    body = refused(response, 422, "invalid_input", started)
    assert "num_speakers" in body["message"]
    assert spool_files(server) == []


# -- generated requests --------------------------------------------------------------------


OPERATIONS = ["POST /transcribe", f"POST {JOBS}", "GET /jobs/{job_id}", "GET /health"]


@pytest.mark.parametrize("label", OPERATIONS)
def test_generated_requests_never_get_a_5xx(server, label):
    """Schemathesis over the server's own /openapi.json: whatever it sends, never a 5xx.

    Driven through Hypothesis directly: schemathesis' pytest plugin does not run on pytest 9.
    """
    schema = schemathesis.openapi.from_url(f"{server.url}/openapi.json")
    operation = schema.find_operation_by_label(label)
    assert operation is not None, f"{label} is not in /openapi.json"
    seen: list[int] = []

    @given(case=operation.as_strategy())
    @hypothesis_settings(max_examples=40, deadline=None, database=None, suppress_health_check=list(HealthCheck))
    def check(case) -> None:
        response = case.call(base_url=server.url, headers={"authorization": f"Bearer {API_KEY}"}, timeout=60)
        seen.append(response.status_code)
        if response.status_code == 503:
            # Generated jobs that are valid (a URL, an upload) queue up faster than they fail, and the
            # test server admits 6: its documented backpressure answer, not an error.
            assert response.json()["error"] == "overloaded"
            return
        assert response.status_code < 500, f"{case.method} {case.path}: {response.status_code} {response.text}"
        if response.status_code >= 400:
            assert response.json()["error"], response.text  # every refusal is our JSON error body

    check()
    assert len(seen) >= (1 if label == "GET /health" else 10)  # /health takes no input: one request


# -- after all of it -----------------------------------------------------------------------


def test_the_server_is_healthy_after_all_of_it(client, canary):
    assert client.get("/health").json()["status"] == "ok"
    response = client.post("/transcribe", json={"audio_path": str(ES)})
    assert response.status_code == 200 and response.json()["language"] == "es"
    assert canary.hits == []
