// The ECG Audio Analyzer page: submit media, follow the job's events, draw its result.
// Every text that comes from the server or the media goes in through textContent, never as HTML.

const JOBS = "/api/upload-video/process-video";
const KEY_STORAGE = "ecg-api-key";
const FINAL_EVENTS = new Set(["completed", "failed", "cancelled"]);
const RECONNECT_DELAYS_MS = [500, 1000, 2000, 4000, 8000]; // then the stream counts as lost
const PALETTE = ["#2563eb", "#dc2626", "#059669", "#d97706", "#7c3aed", "#db2777", "#0891b2", "#65a30d"];
const SVG_NS = "http://www.w3.org/2000/svg";

const $ = (id) => document.getElementById(id);

class ApiError extends Error {
  constructor(status, code, message) {
    super(message);
    this.status = status;
    this.code = code;
  }
}

// -- talking to the server --------------------------------------------------------------------

function withKey(headers = {}) {
  const key = $("api-key").value.trim();
  return key ? { ...headers, authorization: `Bearer ${key}` } : headers;
}

async function errorOf(response) {
  let body = null;
  try {
    body = await response.json();
  } catch {
    // not JSON (a proxy's error page): the status says enough
  }
  const message = typeof body?.message === "string" ? body.message : `HTTP ${response.status}`;
  return new ApiError(response.status, body?.error ?? "http_error", message);
}

async function api(path, init = {}) {
  const response = await fetch(path, { ...init, headers: withKey(init.headers) });
  if (!response.ok) throw await errorOf(response);
  return response.json();
}

function sleep(ms, signal) {
  return new Promise((resolve, reject) => {
    const timer = setTimeout(resolve, ms);
    signal.addEventListener("abort", () => (clearTimeout(timer), reject(signal.reason)), { once: true });
  });
}

// Server-sent events read with fetch(): EventSource cannot send an Authorization header.
// Parsed as the HTML standard says: lines end in CR, LF or CRLF; a blank line ends an event;
// lines starting with ":" are comments (keep-alives); "id" persists across events.
async function* serverSentEvents(body) {
  const reader = body.pipeThrough(new TextDecoderStream()).getReader();
  let buffer = "";
  let type = "";
  let data = [];
  let id = null;
  try {
    for (;;) {
      const { value, done } = await reader.read();
      if (done) return;
      buffer += value;
      // A CR at the very end may be the first half of a CRLF: keep it for the next chunk.
      const end = buffer.endsWith("\r") ? buffer.length - 1 : buffer.length;
      const lines = buffer.slice(0, end).split(/\r\n|\r|\n/);
      buffer = lines.pop() + buffer.slice(end);
      for (const line of lines) {
        if (line === "") {
          if (data.length) yield { type: type || "message", data: data.join("\n"), id };
          type = "";
          data = [];
          continue;
        }
        if (line.startsWith(":")) continue;
        const colon = line.indexOf(":");
        const field = colon < 0 ? line : line.slice(0, colon);
        let text = colon < 0 ? "" : line.slice(colon + 1);
        if (text.startsWith(" ")) text = text.slice(1);
        if (field === "event") type = text;
        else if (field === "data") data.push(text);
        else if (field === "id" && !text.includes("\0")) id = text;
      }
    }
  } finally {
    reader.cancel().catch(() => {});
  }
}

// Follows a job's events until the final one, calling `onUpdate` with each JobView. A stream that
// breaks before the final event is opened again with Last-Event-ID, so no event is lost or repeated.
async function followJob(jobId, onUpdate, signal) {
  const url = `/jobs/${encodeURIComponent(jobId)}/events`;
  let lastId = null;
  let failures = 0;
  let lastError = null;
  for (;;) {
    const headers = { accept: "text/event-stream" };
    if (lastId !== null) headers["last-event-id"] = lastId;
    try {
      const response = await fetch(url, { headers: withKey(headers), cache: "no-store", signal });
      if (!response.ok) {
        lastError = await errorOf(response);
        if (response.status < 500) throw lastError; // no key, no such job: asking again will not help
      } else {
        for await (const event of serverSentEvents(response.body)) {
          if (event.id !== null) lastId = event.id;
          failures = 0;
          const view = JSON.parse(event.data);
          onUpdate(view);
          if (FINAL_EVENTS.has(event.type)) return { type: event.type, view };
        }
      }
    } catch (error) {
      if (signal.aborted || error instanceof ApiError) throw error;
      lastError = error; // the connection broke: open it again below
    }
    if (failures >= RECONNECT_DELAYS_MS.length) {
      const reason = lastError ? ` (${lastError.message})` : "";
      throw new Error(`Lost the job's progress stream${reason}; the job itself goes on on the server.`);
    }
    await sleep(RECONNECT_DELAYS_MS[failures++], signal);
  }
}

// -- the form ---------------------------------------------------------------------------------

let running = null; // { controller, jobId } of the job this page follows
let shownJob = null; // the job whose result the page shows
let objectUrl = null; // the uploaded file, played by the <audio> element

function request() {
  const mode = document.querySelector('input[name="mode"]:checked').value;
  const language = $("language").value;
  const speakers = $("num-speakers").value.trim();
  if (mode === "file") {
    const file = $("file").files[0];
    if (!file) throw new Error("Choose a file to upload.");
    const form = new FormData();
    form.append("file", file);
    form.append("language", language);
    if (speakers) form.append("num_speakers", speakers);
    if (objectUrl) URL.revokeObjectURL(objectUrl);
    objectUrl = URL.createObjectURL(file);
    return { init: { body: form }, audio: objectUrl };
  }
  const url = $("url").value.trim();
  if (!url) throw new Error("Give the URL of an audio or video file.");
  const body = { audio_path: url, language };
  if (speakers) body.num_speakers = Number(speakers);
  return { init: { body: JSON.stringify(body), headers: { "content-type": "application/json" } }, audio: url };
}

async function analyze(event) {
  event.preventDefault();
  running?.controller.abort();
  const controller = new AbortController();
  const job = { controller, jobId: null };
  running = job;
  showError(null);
  $("results").hidden = true;
  try {
    const { init, audio } = request();
    setBusy(true);
    showJob({ job_id: "", status: "uploading", progress: 0, message: "Sending the media…" });
    const accepted = await api(JOBS, { ...init, method: "POST", signal: controller.signal });
    job.jobId = accepted.job_id;
    showJob(accepted);
    const final = await followJob(accepted.job_id, showJob, controller.signal);
    if (final.type === "completed") {
      const view = await api(`/jobs/${encodeURIComponent(accepted.job_id)}`, { signal: controller.signal });
      if (!view.result) throw new Error("The job completed but its result is missing.");
      showResult(accepted.job_id, view.result, audio);
    } else if (final.type === "failed") {
      showError(final.view.error?.message || final.view.message || "The analysis failed.");
    } else {
      showError("The job was cancelled.");
    }
  } catch (error) {
    if (!controller.signal.aborted) showError(error.message);
    if (error instanceof ApiError && error.status === 401) $("api-key").focus();
  } finally {
    if (running === job) {
      running = null;
      setBusy(false);
    }
  }
}

async function cancel() {
  if (!running) return;
  if (!running.jobId) {
    running.controller.abort(); // still uploading: no job yet
    showError("Upload cancelled.");
    return;
  }
  try {
    await api(`/jobs/${encodeURIComponent(running.jobId)}`, { method: "DELETE" });
  } catch (error) {
    showError(error.message); // the job may have finished meanwhile: its final event says so
  }
}

function setBusy(busy) {
  $("analyze").disabled = busy;
  $("cancel").hidden = !busy;
}

function showJob(view) {
  $("status").hidden = false;
  $("job-id").textContent = view.job_id ? `Job ${view.job_id}` : "";
  $("job-id").dataset.jobId = view.job_id;
  $("job-status").textContent = view.status;
  $("job-status").dataset.status = view.status;
  $("progress").value = view.progress;
  $("progress").textContent = `${Math.round(view.progress)}%`;
  $("message").textContent = view.message ? `${Math.round(view.progress)}% · ${view.message}` : "";
}

function showError(message) {
  $("error").hidden = !message;
  $("error").textContent = message ?? "";
}

// -- the result -------------------------------------------------------------------------------

function showResult(jobId, result, audioSource) {
  shownJob = jobId;
  $("audio-note").hidden = true;
  const order = speakerOrder(result);
  const colour = new Map(order.map((id, i) => [id, speakerColour(i)]));
  const words = result.segments.flatMap((s) => s.words.map((w) => ({ ...w, speaker: s.speaker.speaker_id })));
  $("audio").src = audioSource;
  const duration = Math.max(result.duration, ...result.segments.map((s) => s.end_time), 0.001);
  $("summary").textContent =
    `${formatTime(result.duration)} · language ${result.language} · ` +
    `${order.length} speaker${order.length === 1 ? "" : "s"} · ${words.length} words`;
  $("results").hidden = false; // before drawing: the charts take their size from the page
  drawTimeline(result.segments, order, colour, duration);
  drawSpeakingTime(result.speakers, order, colour, duration);
  const acoustic = words.filter((w) => w.acoustic_features);
  drawChart($("pitch-chart"), points(acoustic, "pitch_hz"), order, colour, duration, "Hz");
  drawChart($("volume-chart"), points(acoustic, "volume_db"), order, colour, duration, "dB");
  drawTranscript(result.segments, colour);
}

// Speakers in the order they first speak; any the summary lists without a segment come last.
function speakerOrder(result) {
  const ids = result.segments.map((s) => s.speaker.speaker_id);
  return [...new Set([...ids, ...Object.keys(result.speakers).sort()])];
}

function speakerColour(index) {
  return index < PALETTE.length ? PALETTE[index] : `hsl(${(index * 137.5) % 360} 65% 45%)`;
}

function points(words, feature) {
  return words
    .map((w) => ({ t: w.start, v: w.acoustic_features[feature], speaker: w.speaker, word: w.word }))
    .filter((p) => Number.isFinite(p.v)); // words without voiced frames have no pitch
}

// The result as a file: fetched with the key (a plain link could not send it), then saved.
async function download(format) {
  try {
    const response = await fetch(`/jobs/${encodeURIComponent(shownJob)}/result?format=${format}`, {
      headers: withKey(),
    });
    if (!response.ok) throw await errorOf(response);
    const link = element("a");
    link.href = URL.createObjectURL(await response.blob());
    link.download = `${shownJob}.${format}`;
    link.click();
    setTimeout(() => URL.revokeObjectURL(link.href), 60_000);
  } catch (error) {
    showError(error.message);
  }
}

function playFrom(seconds) {
  const audio = $("audio");
  audio.currentTime = seconds;
  audio.play().catch(() => {
    // no audio output here, or the media cannot be played: the position is set all the same
  });
}

function drawSpeakingTime(speakers, order, colour, duration) {
  const rows = order.map((id) => {
    const seconds = speakers[id]?.total_duration ?? 0;
    const share = Math.min(100, (100 * seconds) / duration);
    const row = element("div", "share");
    row.dataset.speaker = id;
    row.style.setProperty("--speaker", colour.get(id));
    const bar = element("div", "bar");
    const fill = element("div", "fill");
    fill.style.width = `${share}%`;
    bar.append(fill);
    row.append(element("span", "speaker", id), bar, element("span", "value", `${seconds.toFixed(1)} s · ${share.toFixed(0)}%`));
    return row;
  });
  const note = element("p", "hint", "Percent of the recording; overlapping speech counts for each speaker.");
  $("speaking-time").replaceChildren(...rows, note);
}

function drawTranscript(segments, colour) {
  const turns = [];
  for (const segment of segments) {
    const last = turns.at(-1);
    if (last && last.speaker === segment.speaker.speaker_id) last.segments.push(segment);
    else turns.push({ speaker: segment.speaker.speaker_id, segments: [segment] });
  }
  const blocks = turns.map(({ speaker, segments: parts }) => {
    const block = element("article", "turn");
    block.dataset.speaker = speaker;
    block.style.setProperty("--speaker", colour.get(speaker));
    const start = parts[0].start_time;
    const end = parts.at(-1).end_time;
    const header = element("header");
    const time = element("button", "time", `${formatTime(start)} – ${formatTime(end)}`);
    time.type = "button";
    time.dataset.start = start;
    header.append(element("span", "speaker", speaker), time);
    const text = element("p");
    for (const segment of parts) {
      if (!segment.words.length) text.append(element("span", "unaligned", segment.text), " ");
      for (const word of segment.words) {
        const span = element("span", "word", word.word.trim());
        span.dataset.start = word.start;
        span.dataset.end = word.end;
        span.tabIndex = 0;
        span.title = formatTime(word.start);
        text.append(span, " ");
      }
    }
    block.append(header, text);
    return block;
  });
  $("transcript").replaceChildren(...blocks);
  wordSpans = [...$("transcript").querySelectorAll(".word")];
}

// -- charts (SVG) -----------------------------------------------------------------------------

const MARGIN = { left: 64, right: 12, top: 10, bottom: 26 };

function drawTimeline(segments, order, colour, duration) {
  const row = 26;
  const height = MARGIN.top + order.length * row + MARGIN.bottom;
  const { svg, width } = resetSvg($("timeline"), height);
  const groups = order.map((id) => svgElement("g", { class: "series", "data-speaker": id, fill: colour.get(id) }, svg));
  const labels = order.map((id, i) => {
    const label = svgElement("text", { y: MARGIN.top + (i + 0.5) * row, class: "label", "text-anchor": "end" }, groups[i]);
    label.textContent = id;
    return label;
  });
  const left = 12 + Math.max(...labels.map((label) => label.getComputedTextLength())); // room for the longest name
  for (const label of labels) label.setAttribute("x", left - 8);
  const x = scale(0, duration, left, width - MARGIN.right);
  timeAxis(svg, x, duration, height - MARGIN.bottom);
  order.forEach((id, i) => {
    const y = MARGIN.top + i * row;
    for (const s of segments.filter((seg) => seg.speaker.speaker_id === id)) {
      const rect = svgElement("rect", {
        x: x(s.start_time),
        y: y + 3,
        width: Math.max(1, x(s.end_time) - x(s.start_time)),
        height: row - 6,
        rx: 3,
        class: "span",
        "data-start": s.start_time,
      }, groups[i]);
      svgElement("title", {}, rect).textContent = `${id} ${formatTime(s.start_time)} – ${formatTime(s.end_time)}`;
    }
  });
}

function drawChart(svg, data, order, colour, duration, unit) {
  const height = 240;
  const { width } = resetSvg(svg, height);
  if (!data.length) {
    svgElement("text", { x: width / 2, y: height / 2, class: "empty", "text-anchor": "middle" }, svg).textContent =
      "no values";
    return;
  }
  const values = data.map((p) => p.v);
  const [low, high] = paddedRange(Math.min(...values), Math.max(...values));
  const x = scale(0, duration, MARGIN.left, width - MARGIN.right);
  const y = scale(low, high, height - MARGIN.bottom, MARGIN.top);
  timeAxis(svg, x, duration, height - MARGIN.bottom);
  for (const tick of niceTicks(low, high, 5)) {
    svgElement("line", { x1: MARGIN.left, x2: width - MARGIN.right, y1: y(tick), y2: y(tick), class: "grid" }, svg);
    svgElement("text", { x: MARGIN.left - 6, y: y(tick), class: "tick", "text-anchor": "end" }, svg).textContent =
      `${Math.round(tick)} ${unit}`;
  }
  for (const id of order) {
    const own = data.filter((p) => p.speaker === id);
    if (!own.length) continue;
    const group = svgElement("g", { class: "series", "data-speaker": id, fill: colour.get(id), stroke: colour.get(id) }, svg);
    for (const run of runs(own)) {
      svgElement("polyline", { class: "trend", points: run.map((p) => `${x(p.t)},${y(p.v)}`).join(" ") }, group);
    }
    for (const p of own) {
      const dot = svgElement("circle", { cx: x(p.t), cy: y(p.v), r: 3.5, class: "point", "data-start": p.t }, group);
      svgElement("title", {}, dot).textContent = `${p.word.trim()} · ${formatTime(p.t)} · ${p.v.toFixed(1)} ${unit}`;
    }
  }
}

// A speaker's points split where they pause: a trend line joins words of one stretch of speech only.
function runs(data, pause = 1.5) {
  const all = [];
  for (const p of data) {
    const run = all.at(-1);
    if (run && p.t - run.at(-1).t <= pause) run.push(p);
    else all.push([p]);
  }
  return all;
}

function timeAxis(svg, x, duration, baseline) {
  svgElement("line", { x1: x(0), x2: x(duration), y1: baseline, y2: baseline, class: "axis" }, svg);
  const count = Math.max(2, Math.floor((x(duration) - x(0)) / 80)); // a label every 80 px or more
  for (const tick of niceTicks(0, duration, count)) {
    svgElement("line", { x1: x(tick), x2: x(tick), y1: baseline, y2: baseline + 4, class: "axis" }, svg);
    svgElement("text", { x: x(tick), y: baseline + 16, class: "tick", "text-anchor": "middle" }, svg).textContent =
      formatTime(tick, false);
  }
}

// Drawn in the page's own pixels (text at its real size); a later resize scales the drawing.
function resetSvg(svg, height) {
  svg.replaceChildren();
  const width = Math.max(320, Math.round(svg.getBoundingClientRect().width));
  svg.setAttribute("viewBox", `0 0 ${width} ${height}`);
  return { svg, width };
}

function scale(from, to, start, end) {
  const span = to - from || 1;
  return (value) => start + ((value - from) / span) * (end - start);
}

function paddedRange(low, high) {
  const pad = Math.max((high - low) * 0.08, 1);
  return [low - pad, high + pad];
}

// Round steps (1, 2 or 5 times a power of ten) between low and high, about `count` of them.
function niceTicks(low, high, count) {
  const raw = (high - low) / count || 1;
  const power = 10 ** Math.floor(Math.log10(raw));
  const step = [1, 2, 5, 10].map((m) => m * power).find((s) => s >= raw);
  const ticks = [];
  for (let t = Math.ceil(low / step) * step; t <= high + 1e-9; t += step) ticks.push(Number(t.toFixed(6)));
  return ticks;
}

// -- small helpers ----------------------------------------------------------------------------

function element(tag, className, text) {
  const node = document.createElement(tag);
  if (className) node.className = className;
  if (text !== undefined) node.textContent = text;
  return node;
}

function svgElement(tag, attributes, parent) {
  const node = document.createElementNS(SVG_NS, tag);
  for (const [name, value] of Object.entries(attributes)) node.setAttribute(name, value);
  parent.append(node);
  return node;
}

function formatTime(seconds, tenths = true) {
  seconds = tenths ? Math.round(seconds * 10) / 10 : Math.floor(seconds); // 59.96 s is 1:00.0, not 0:60.0
  const minutes = Math.floor(seconds / 60);
  const rest = seconds - minutes * 60;
  const text = tenths ? rest.toFixed(1).padStart(4, "0") : String(Math.floor(rest)).padStart(2, "0");
  if (minutes < 60) return `${minutes}:${text}`;
  return `${Math.floor(minutes / 60)}:${String(minutes % 60).padStart(2, "0")}:${text}`;
}

// -- the word being played --------------------------------------------------------------------

let wordSpans = [];
let current = null;

function markCurrentWord() {
  const t = $("audio").currentTime;
  // The last word starting at or before t (spans are in time order): binary search.
  let lo = 0;
  let hi = wordSpans.length - 1;
  let found = null;
  while (lo <= hi) {
    const mid = (lo + hi) >> 1;
    if (Number(wordSpans[mid].dataset.start) <= t) {
      found = wordSpans[mid];
      lo = mid + 1;
    } else hi = mid - 1;
  }
  if (found && t > Number(found.dataset.end)) found = null;
  if (found === current) return;
  current?.classList.remove("current");
  found?.classList.add("current");
  current = found;
}

// -- wiring -----------------------------------------------------------------------------------

function seekFromEvent(event) {
  const target = event.target.closest("[data-start]");
  if (target) playFrom(Number(target.dataset.start));
}

function start() {
  const key = $("api-key");
  key.value = sessionStorage.getItem(KEY_STORAGE) ?? "";
  key.addEventListener("input", () => sessionStorage.setItem(KEY_STORAGE, key.value.trim()));
  for (const radio of document.querySelectorAll('input[name="mode"]')) {
    radio.addEventListener("change", () => {
      const file = radio.value === "file" && radio.checked;
      $("file").disabled = !file;
      $("url").disabled = file;
    });
  }
  $("key-form").addEventListener("submit", (event) => event.preventDefault());
  $("submit-form").addEventListener("submit", analyze);
  $("cancel").addEventListener("click", cancel);
  for (const id of ["transcript", "timeline", "pitch-chart", "volume-chart"]) {
    $(id).addEventListener("click", seekFromEvent);
  }
  $("transcript").addEventListener("keydown", (event) => {
    if ((event.key === "Enter" || event.key === " ") && event.target.classList.contains("word")) {
      event.preventDefault();
      seekFromEvent(event);
    }
  });
  $("audio").addEventListener("timeupdate", markCurrentWord);
  $("audio").addEventListener("error", () => ($("audio-note").hidden = !$("audio").getAttribute("src")));
  for (const button of document.querySelectorAll("[data-format]")) {
    button.addEventListener("click", () => download(button.dataset.format));
  }
}

start();

// For tests in the browser (tests/test_web.py): the stream reading, without a server.
export { followJob, serverSentEvents };
