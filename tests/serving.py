"""Real parts for the server tests: the product started with `serve run` in a
child process (its own Ray instance), and an HTTP server that receives callbacks."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import httpx
import yaml

ROOT = Path(__file__).resolve().parent.parent
SERVE = ROOT / ".venv" / "bin" / "serve"
# The one non-public address the test server may reach (ECG_NETWORK__ALLOWED_HOSTS): callback receivers
# and media servers of the tests bind it, while 127.0.0.1 (Ray's dashboard, the server itself) stays refused.
TRUSTED_HOST = "127.0.0.2"
JOBS = "/api/upload-video/process-video"
API_KEY = "test-key-alpha-2f6c1e0b9d"
OTHER_KEY = "test-key-beta-7a3d5c8e41"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def kill_session(leader: subprocess.Popen) -> None:
    """SIGKILL to every process of the session `leader` started (start_new_session=True), all at once."""
    subprocess.run(["pkill", "-KILL", "-s", str(leader.pid)], check=False)
    leader.wait(timeout=30)
    deadline = time.monotonic() + 30
    while subprocess.run(["pgrep", "-s", str(leader.pid)], capture_output=True).stdout.strip():
        assert time.monotonic() < deadline, "processes of the killed session are still alive"
        time.sleep(0.5)


class ServeProcess:
    """`serve run` on a copy of serve_config.yaml that listens on a free loopback port."""

    def __init__(self, workdir: Path, env: dict[str, str], adjust: Callable[[dict], None] | None = None) -> None:
        self.workdir = workdir
        self.port = free_port()
        config = yaml.safe_load((ROOT / "serve_config.yaml").read_text())
        config["http_options"] = {"host": "127.0.0.1", "port": self.port}
        if adjust is not None:
            adjust(config)
        self.config_path = workdir / "serve_config.yaml"
        self.config_path.write_text(yaml.safe_dump(config))
        # RAY_ADDRESS=local: always a Ray instance of its own, never one already running here.
        self.env = {**os.environ, "RAY_USAGE_STATS_ENABLED": "0", "RAY_ADDRESS": "local", **env}
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = workdir / "serve.log"
        self._proc: subprocess.Popen | None = None

    def start(self, timeout_s: float = 420) -> None:
        log = self.log_path.open("a")
        serve = SERVE if SERVE.exists() else "serve"
        # cwd = the repository: the config names configs/default.yaml relative to it, as in the README.
        self._proc = subprocess.Popen(
            [str(serve), "run", str(self.config_path)],
            cwd=ROOT,
            env=self.env,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self._proc.poll() is not None:
                raise RuntimeError(f"serve run exited with {self._proc.returncode}:\n{self.log_tail()}")
            try:
                if httpx.get(f"{self.url}/health", timeout=10).json().get("status") == "ok":
                    return
            except (httpx.HTTPError, ValueError):
                pass
            time.sleep(2)
        self.stop()
        raise RuntimeError(f"server not healthy after {timeout_s} s:\n{self.log_tail()}")

    def stop(self) -> None:
        """Ctrl-C, as a user would: serve run shuts Serve and its Ray instance down."""
        if self._proc is None or self._proc.poll() is not None:
            return
        os.killpg(self._proc.pid, signal.SIGINT)
        try:
            self._proc.wait(timeout=90)
        except subprocess.TimeoutExpired:
            os.killpg(self._proc.pid, signal.SIGKILL)
            self._proc.wait()

    def kill(self) -> None:
        """SIGKILL to `serve run` and every process of its session (Ray's GCS, raylet, workers...): a crash."""
        assert self._proc is not None
        kill_session(self._proc)

    def log_tail(self, lines: int = 60) -> str:
        return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])


@dataclass
class Callback:
    path: str
    headers: dict[str, str]
    raw: bytes
    answered: int

    @property
    def body(self) -> dict:
        return json.loads(self.raw)

    @property
    def final(self) -> bool:
        return self.body["status"] in ("completed", "failed", "cancelled")


@dataclass
class CallbackReceiver:
    """An HTTP server on loopback recording every POST; it can refuse final callbacks on purpose."""

    calls: list[Callback] = field(default_factory=list)
    refuse_finals: dict[str, int] = field(default_factory=dict)  # path -> how many to answer 500
    scripted: dict[str, list[int]] = field(default_factory=dict)  # path -> statuses to answer first, in order

    host: str = TRUSTED_HOST
    port: int = 0  # 0: any free port

    def __post_init__(self) -> None:
        receiver = self
        self._lock = threading.Lock()

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:  # noqa: N802 (http.server's naming)
                raw = self.rfile.read(int(self.headers.get("content-length", 0)))
                status = receiver._answer(self.path, raw)
                with receiver._lock:
                    receiver.calls.append(Callback(self.path, dict(self.headers), raw, status))
                self.send_response(status)
                self.end_headers()

            def log_message(self, *args: object) -> None:
                pass

        self._server = ThreadingHTTPServer((self.host, self.port), Handler)
        threading.Thread(target=self._server.serve_forever, daemon=True).start()

    def _answer(self, path: str, raw: bytes) -> int:
        with self._lock:
            if self.scripted.get(path):
                return self.scripted[path].pop(0)
            final = json.loads(raw).get("status") in ("completed", "failed", "cancelled")
            if final and self.refuse_finals.get(path, 0) > 0:
                self.refuse_finals[path] -= 1
                return 500
        return 200

    def url(self, path: str) -> str:
        return f"http://{self.host}:{self._server.server_port}{path}"

    def received(self, path: str) -> list[Callback]:
        with self._lock:
            return [c for c in self.calls if c.path == path]

    def wait_final(self, path: str, timeout_s: float = 300) -> list[Callback]:
        """Every callback to `path`, once one final callback has been accepted (200)."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            calls = self.received(path)
            if any(c.final and c.answered == 200 for c in calls):
                time.sleep(0.5)  # anything sent after the final one would show up now
                return self.received(path)
            time.sleep(0.2)
        raise TimeoutError(f"no final callback on {path} within {timeout_s} s; got {len(self.received(path))}")

    def close(self) -> None:
        self._server.shutdown()


class Recorder:
    """An HTTP server that answers every request with `routes` (path -> (status, headers, body)) and
    records the paths asked for. On 127.0.0.1 it is the canary: the server must never reach it."""

    def __init__(self, host: str, routes: dict[str, tuple[int, dict[str, str], bytes]] | None = None) -> None:
        self.host = host
        self.routes = routes or {}
        self.hits: list[str] = []
        recorder = self

        class Handler(BaseHTTPRequestHandler):
            def _answer(self) -> None:
                recorder.hits.append(self.path)
                status, headers, body = recorder.routes.get(self.path.split("?")[0], (404, {}, b"not here"))
                self.send_response(status)
                for name, value in {"content-length": str(len(body)), **headers}.items():
                    self.send_header(name, value)
                self.end_headers()
                self.wfile.write(body)

            do_GET = do_POST = do_HEAD = _answer  # noqa: N815 (http.server's naming)

            def log_message(self, *args: object) -> None:
                pass

        self._server = ThreadingHTTPServer((host, 0), Handler)
        self.port = self._server.server_port
        threading.Thread(target=self._server.serve_forever, daemon=True).start()

    def url(self, path: str) -> str:
        return f"http://{self.host}:{self.port}{path}"

    def close(self) -> None:
        self._server.shutdown()
