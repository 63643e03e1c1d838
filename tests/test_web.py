"""The web page in a real browser: Debian's headless Chromium, driven by Selenium, uploads a
committed fixture to the test server (API keys on) and reads the finished transcript back off
the page. Also the page's routes over HTTP: public, typed, and closed to path traversal.

Chromium is a system package the Makefile installs (SYSTEM_PACKAGES): without it these tests
fail, they never skip.
"""

from __future__ import annotations

import http.client
import json
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import jiwer
import pytest
from selenium import webdriver
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.common.by import By
from selenium.webdriver.remote.webdriver import WebDriver

from tests.conftest import fixture_path, truth, words_of
from tests.serving import API_KEY

CHROMIUM = Path("/usr/bin/chromium")
CHROMEDRIVER = Path("/usr/bin/chromedriver")
# Everything Chromium would fetch on its own stays off: nothing but loopback is reachable here.
CHROMIUM_FLAGS = [
    "--headless",
    "--no-sandbox",  # the tests run as root
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--window-size=1280,1600",
]
ANALYSIS_TIMEOUT_S = 300


@contextmanager
def chromium(downloads: Path | None = None) -> Iterator[WebDriver]:
    """Headless Chromium with its console log kept, saving downloads in `downloads`; always quit."""
    assert CHROMIUM.exists() and CHROMEDRIVER.exists(), "apt-get install chromium chromium-driver (make setup)"
    options = webdriver.ChromeOptions()
    options.binary_location = str(CHROMIUM)
    for flag in [*CHROMIUM_FLAGS, f"--user-data-dir={tempfile.mkdtemp(prefix='ecg-chromium-')}"]:
        options.add_argument(flag)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    if downloads is not None:
        options.add_experimental_option(
            "prefs", {"download.default_directory": str(downloads), "download.prompt_for_download": False}
        )
    # The Debian driver, named: Selenium never goes looking for one to download.
    driver = webdriver.Chrome(service=Service(str(CHROMEDRIVER)), options=options)
    try:
        driver.set_page_load_timeout(60)
        driver.set_script_timeout(30)
        yield driver
    finally:
        driver.quit()


@dataclass
class AnalysedPage:
    """The page after a real upload of the dialogue ran to its end."""

    driver: WebDriver
    downloads: Path
    job_id: str
    result: dict
    progress_seen: list[float]
    console: list[dict] = field(default_factory=list)

    def read_console(self) -> list[dict]:
        self.console += self.driver.get_log("browser")  # each call returns what came since the last one
        return self.console

    def script(self, code: str, *args):
        return self.driver.execute_script(code, *args)


def wait_for_result(driver: WebDriver, timeout_s: float) -> list[float]:
    """Poll the page until the result shows (the progress bar's values on the way), or fail."""
    seen = []
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        state = driver.execute_script(
            "return [Number(document.getElementById('progress').value),"
            " !document.getElementById('results').hidden, document.getElementById('error').textContent]"
        )
        seen.append(state[0])
        assert not state[2], f"the page shows an error: {state[2]}"
        if state[1]:
            return seen
        time.sleep(0.2)
    raise AssertionError(f"no result on the page within {timeout_s} s; progress seen: {sorted(set(seen))}")


@pytest.fixture(scope="module")
def page(server, client, tmp_path_factory) -> Iterator[AnalysedPage]:
    downloads = tmp_path_factory.mktemp("downloads")
    with chromium(downloads) as driver:
        driver.get(server.url + "/")
        driver.find_element(By.ID, "api-key").send_keys(API_KEY)
        driver.find_element(By.ID, "file").send_keys(str(fixture_path("dialogue_en.flac")))
        driver.find_element(By.ID, "analyze").click()
        progress = wait_for_result(driver, ANALYSIS_TIMEOUT_S)
        job_id = driver.find_element(By.ID, "job-id").get_attribute("data-job-id")
        job = client.get(f"/jobs/{job_id}").json()
        assert job["status"] == "completed", job
        yield AnalysedPage(driver, downloads, job_id, job["result"], progress)


def test_the_progress_bar_follows_the_job_to_100(page):
    progress = page.progress_seen
    assert progress[-1] == 100
    assert any(0 < p < 100 for p in progress), f"no live progress between 0 and 100: {sorted(set(progress))}"
    assert progress == sorted(progress), "the progress bar went back"
    assert page.driver.find_element(By.ID, "job-status").text == "completed"


def test_the_key_is_kept_for_the_session(page):
    assert page.script("return sessionStorage.getItem('ecg-api-key')") == API_KEY


def test_the_transcript_is_the_results(page):
    spans = page.driver.find_elements(By.CSS_SELECTOR, "#transcript .word")
    shown = [s.text for s in spans]
    words = [w for s in page.result["segments"] for w in s["words"]]
    assert shown == [w["word"].strip() for w in words]
    reference = words_of(" ".join(t["text"] for t in truth("dialogue_en")["turns"]))
    assert jiwer.wer(reference, words_of(" ".join(shown))) <= 0.10


def test_turns_by_speaker_with_colours_and_times(page):
    turns = page.script(
        "return [...document.querySelectorAll('#transcript .turn')].map(t => [t.dataset.speaker,"
        " getComputedStyle(t).borderLeftColor, t.querySelector('.time').textContent])"
    )
    expected = []
    for segment in page.result["segments"]:
        speaker = segment["speaker"]["speaker_id"]
        if not expected or expected[-1] != speaker:
            expected.append(speaker)
    assert [t[0] for t in turns] == expected and len(expected) >= 4  # the dialogue alternates
    colours = {speaker: colour for speaker, colour, _ in turns}
    assert all(colours[speaker] == colour for speaker, colour, _ in turns)
    assert len(set(colours.values())) == len(colours) == 2
    first = page.result["segments"][0]
    minutes, seconds = divmod(first["start_time"], 60)
    assert turns[0][2].startswith(f"{int(minutes)}:{seconds:04.1f} – ")


def test_speakers_timeline_and_charts_per_speaker(page):
    speakers = set(page.result["speakers"])
    assert len(speakers) == 2

    def drawn(selector: str) -> list[str]:
        return page.script(f"return [...document.querySelectorAll('{selector}')].map(e => e.dataset.speaker)")

    assert sorted(drawn("#speaking-time .share")) == sorted(speakers)
    assert sorted(drawn("#timeline g.series")) == sorted(speakers)
    segments_of = page.script(
        "return Object.fromEntries([...document.querySelectorAll('#timeline g.series')]"
        ".map(g => [g.dataset.speaker, g.querySelectorAll('rect').length]))"
    )
    for speaker in speakers:
        own = [s for s in page.result["segments"] if s["speaker"]["speaker_id"] == speaker]
        assert segments_of[speaker] == len(own)
    words = [w for s in page.result["segments"] for w in s["words"] if w["acoustic_features"]]
    pitched = [w for w in words if w["acoustic_features"]["pitch_hz"] is not None]
    assert sorted(drawn("#pitch-chart g.series")) == sorted(speakers)
    assert sorted(drawn("#volume-chart g.series")) == sorted(speakers)
    assert len(page.driver.find_elements(By.CSS_SELECTOR, "#pitch-chart circle")) == len(pitched) > 50
    assert len(page.driver.find_elements(By.CSS_SELECTOR, "#volume-chart circle")) == len(words)
    shares = page.driver.find_elements(By.CSS_SELECTOR, "#speaking-time .share .value")
    for share in shares:
        assert share.text.endswith("%") and " s · " in share.text


def test_clicking_a_word_plays_from_it(page):
    spans = page.driver.find_elements(By.CSS_SELECTOR, "#transcript .word")
    assert page.script("return document.getElementById('audio').src").startswith("blob:")
    for span in (spans[len(spans) // 2], spans[5]):  # forwards, then back
        start = float(span.get_attribute("data-start"))
        span.click()
        position = page.script("return document.getElementById('audio').currentTime")
        assert abs(position - start) < 0.5, (span.text, start, position)


@pytest.mark.parametrize("format", ["srt", "json"])
def test_the_result_downloads_as_a_file(page, client, format):
    page.driver.find_element(By.CSS_SELECTOR, f'button[data-format="{format}"]').click()
    saved = page.downloads / f"{page.job_id}.{format}"
    deadline = time.monotonic() + 30
    while not saved.exists() and time.monotonic() < deadline:  # written as .crdownload, then renamed
        time.sleep(0.2)
    assert saved.read_bytes() == client.get(f"/jobs/{page.job_id}/result", params={"format": format}).content


def test_the_browser_console_has_no_errors(page):
    """Last in this module: the log then covers the upload, the events, the drawing and the clicks."""
    entries = page.read_console()
    errors = [e for e in entries if e["level"] == "SEVERE"]
    assert not errors, json.dumps(errors, indent=1)


def test_without_a_key_the_page_shows_the_servers_message(server):
    with chromium() as driver:
        driver.get(server.url + "/")
        driver.find_element(By.ID, "file").send_keys(str(fixture_path("sentence_es.flac")))
        driver.find_element(By.ID, "analyze").click()
        deadline = time.monotonic() + 30
        while not driver.find_element(By.ID, "error").text and time.monotonic() < deadline:
            time.sleep(0.2)
        assert "API key" in driver.find_element(By.ID, "error").text
        assert driver.find_element(By.ID, "results").is_displayed() is False


def wait_until(driver: WebDriver, script: str, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while not driver.execute_script(script):
        assert time.monotonic() < deadline, f"not within {timeout_s} s: {script}"
        time.sleep(0.2)


def test_cancel_from_the_page(server, client):
    with chromium() as driver:
        driver.get(server.url + "/")
        driver.find_element(By.ID, "api-key").send_keys(API_KEY)
        driver.find_element(By.ID, "file").send_keys(str(fixture_path("conversation_4spk.flac")))  # 75 s
        driver.find_element(By.ID, "analyze").click()
        wait_until(driver, "return document.getElementById('job-id').dataset.jobId", 60)
        job_id = driver.find_element(By.ID, "job-id").get_attribute("data-job-id")
        driver.find_element(By.ID, "cancel").click()
        wait_until(driver, "return document.getElementById('error').textContent", 60)
        assert driver.find_element(By.ID, "error").text == "The job was cancelled."
        assert driver.find_element(By.ID, "job-status").text == "cancelled"
        assert driver.find_element(By.ID, "analyze").is_enabled()
    assert client.get(f"/jobs/{job_id}").json()["status"] == "cancelled"


# The event stream's reading in the browser, against scripted responses: chunks cut anywhere (a CRLF
# across two chunks), comments, multi-line data, a stream that errors and one that just ends, each
# resumed with the last id; errors that no retry will mend. Real breaks are hard to cause on cue.
STREAM_SCRIPT = """
const done = arguments[arguments.length - 1];
const encoder = new TextEncoder();
// One chunk a read, then the end or a break (an error right away would drop the chunks not read yet).
const stream = (chunks, fail) => new ReadableStream({
  pull(controller) {
    if (chunks.length) controller.enqueue(encoder.encode(chunks.shift()));
    else if (fail) controller.error(new TypeError("network error"));
    else controller.close();
  },
});
const sse = (status, chunks, fail = false) =>
  new Response(stream(chunks, fail), { status, headers: { "content-type": "text/event-stream" } });
const view = (progress, status = "processing") => JSON.stringify({ job_id: "j", status, progress });
(async () => {
  const app = await import("/static/app.js");
  const parsed = [];
  const chunks = ["retry: 1000\\n\\n: keep-alive\\n\\nid: f-1\\nevent: progress\\ndata: {\\"progress\\": 1",
                  "0}\\r", "\\n\\r\\nid: f-2\\ndata: line1\\ndata:line2\\n\\n", "event: completed\\ndata: {}\\n\\n"];
  for await (const event of app.serverSentEvents(stream(chunks, false))) parsed.push(event);
  const answers = [
    sse(200, [`id: f-1\\nevent: progress\\ndata: ${view(10)}\\n\\n`], true),
    sse(200, [`: keep-alive\\n\\nid: f-2\\nevent: progress\\ndata: ${view(50)}\\n\\n`]),
    sse(200, [`id: f-3\\nevent: completed\\ndata: ${view(100, "completed")}\\n\\n`]),
    new Response('{"error": "unknown_job", "message": "no job j"}', { status: 404 }),
  ];
  const asked = [];
  const realFetch = window.fetch;
  window.fetch = async (url, init) => (asked.push([url, init.headers]), answers.shift());
  document.getElementById("api-key").value = "key-1";
  const updates = [];
  try {
    const final = await app.followJob("j", (v) => updates.push(v.progress), new AbortController().signal);
    let refused = null;
    await app.followJob("j", () => {}, new AbortController().signal).catch((e) => (refused = [e.status, e.message]));
    done({ parsed, final: final.type, updates, asked, refused });
  } finally {
    window.fetch = realFetch;
  }
})().catch((error) => done({ error: String(error) }));
"""


def test_the_event_stream_is_parsed_and_resumed(server):
    with chromium() as driver:
        driver.get(server.url + "/")
        out = driver.execute_async_script(STREAM_SCRIPT)
    assert "error" not in out, out
    assert out["parsed"] == [
        {"type": "progress", "data": '{"progress": 10}', "id": "f-1"},
        {"type": "message", "data": "line1\nline2", "id": "f-2"},
        {"type": "completed", "data": "{}", "id": "f-2"},  # an id holds until the next one
    ]
    assert out["final"] == "completed" and out["updates"] == [10, 50, 100]
    assert [url for url, _ in out["asked"]] == ["/jobs/j/events"] * 4
    assert [headers.get("last-event-id") for _, headers in out["asked"]] == [None, "f-1", "f-2", None]
    assert all(headers["authorization"] == "Bearer key-1" for _, headers in out["asked"])
    assert out["refused"] == [404, "no job j"]  # asked once: no retry mends a missing job


# -- the page's routes over HTTP ------------------------------------------------------------------


def test_the_page_is_served_without_a_key(server):
    with httpx.Client(base_url=server.url, timeout=30) as anonymous:
        page = anonymous.get("/")
        assert page.status_code == 200 and page.headers["content-type"] == "text/html; charset=utf-8"
        assert '<script type="module" src="/static/app.js">' in page.text
        assert "default-src 'self'" in page.headers["content-security-policy"]
        types = {"app.js": "text/javascript", "style.css": "text/css", "index.html": "text/html"}
        for name, media_type in types.items():
            response = anonymous.get(f"/static/{name}")
            assert response.status_code == 200 and response.headers["content-type"].startswith(media_type)
            assert response.headers["x-content-type-options"] == "nosniff"
            again = anonymous.get(f"/static/{name}", headers={"if-none-match": response.headers["etag"]})
            assert again.status_code == 304 and not again.content
        assert anonymous.get("/static/missing.js").status_code == 404
        assert anonymous.get("/jobs/anything").status_code == 401  # the data stays behind the key


TRAVERSALS = [
    "/static/../ingress.py",
    "/static/../../deployments/ingress.py",
    "/static/..%2fingress.py",
    "/static/..%2Fingress.py",
    "/static/%2e%2e/ingress.py",
    "/static/%2e%2e%2fingress.py",
    "/static/%2E%2E%2Fingress.py",
    "/static/..%5cingress.py",
    "/static/%252e%252e%252fingress.py",
    "/static/....//ingress.py",
    "/static/%2fetc%2fpasswd",
    "/static//etc/passwd",
    "/static/..",
    "/static/.",
    "/static/ingress.py",
    "/static/webpage.py",
    "/static/index.html%00.js",
]


@pytest.mark.parametrize("path", TRAVERSALS)
def test_static_files_refuse_traversal(server, path):
    # http.client sends the path as written (httpx would resolve the dot segments first).
    connection = http.client.HTTPConnection("127.0.0.1", server.port, timeout=30)
    try:
        connection.request("GET", path)
        response = connection.getresponse()
        body = response.read().decode(errors="replace")
    finally:
        connection.close()
    # 404, or 401 where a ".." segment takes the path out of the open "/static/*" prefix: never a file.
    assert response.status in (401, 404), (path, response.status, body[:200])
    assert response.getheader("content-type") == "application/json" and "error" in json.loads(body)
