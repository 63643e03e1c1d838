"""A real multi-node Ray cluster on one machine: `ray start --head` and more
`ray start --address` nodes, each in its own process session (`--block`), so a
test can kill one node, all its processes at once, as a machine that dies.

Every port is chosen free, so the cluster never meets another Ray instance on
this machine (the shared test server's, for one).
"""

from __future__ import annotations

import json
import os
import secrets
import subprocess
import time
from pathlib import Path

from tests.serving import ROOT, free_port, kill_session

RAY = ROOT / ".venv" / "bin" / "ray"


class RayNode:
    def __init__(self, args: list[str], env: dict[str, str], log: Path) -> None:
        self._log = log
        ports = {
            "--node-manager-port": free_port(),
            "--object-manager-port": free_port(),
            "--dashboard-agent-listen-port": free_port(),
            "--dashboard-agent-grpc-port": free_port(),
            "--metrics-export-port": free_port(),
            "--runtime-env-agent-port": free_port(),
        }
        command = [str(RAY), "start", "--block", "--disable-usage-stats", "--node-ip-address=127.0.0.1", *args]
        command += [f"{flag}={port}" for flag, port in ports.items()]
        self._proc = subprocess.Popen(
            command, env=env, stdout=log.open("a"), stderr=subprocess.STDOUT, start_new_session=True
        )

    def pids(self, pattern: str) -> list[int]:
        """Processes of this node whose command line contains `pattern`."""
        found = subprocess.run(["pgrep", "-s", str(self._proc.pid), "-f", pattern], capture_output=True, text=True)
        return [int(p) for p in found.stdout.split()]

    def kill(self) -> None:
        """SIGKILL to every process of the node: its raylet, object store and workers."""
        kill_session(self._proc)

    @property
    def alive(self) -> bool:
        return self._proc.poll() is None


class RayCluster:
    """A head node with `head_cpus` logical CPUs; `add_node` joins more."""

    def __init__(self, workdir: Path, env: dict[str, str], head_cpus: int) -> None:
        self.workdir = workdir
        # Ray's token authentication, as the README advises for a cluster: every process carries the token.
        self.token = secrets.token_hex(32)
        auth = {"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": self.token}
        self.env = {**os.environ, "RAY_USAGE_STATS_ENABLED": "0", **auth, **env}
        self.port = free_port()
        self.dashboard_port = free_port()
        self.address = f"127.0.0.1:{self.port}"
        self.temp_dir = Path("/tmp") / f"ray-cluster-{self.port}"  # short: Ray's socket paths have a length limit
        self.head = RayNode(
            [
                "--head",
                f"--port={self.port}",
                f"--num-cpus={head_cpus}",
                f"--temp-dir={self.temp_dir}",
                f"--ray-client-server-port={free_port()}",
                "--include-dashboard=true",
                "--dashboard-host=127.0.0.1",
                f"--dashboard-port={self.dashboard_port}",
            ],
            self.env,
            workdir / "head.log",
        )
        self.nodes: list[RayNode] = [self.head]
        self._wait_for_nodes(1)

    def add_node(self, num_cpus: int, resources: dict[str, float]) -> RayNode:
        node = RayNode(
            [f"--address={self.address}", f"--num-cpus={num_cpus}", f"--resources={json.dumps(resources)}"],
            self.env,
            self.workdir / f"node{len(self.nodes)}.log",
        )
        self.nodes.append(node)
        self._wait_for_nodes(sum(n.alive for n in self.nodes))
        return node

    def alive_nodes(self) -> tuple[int, str]:
        """Nodes alive, as a driver connected to the cluster sees them (and its stderr, for failures)."""
        script = "import ray; ray.init(); print(sum(n['Alive'] for n in ray.nodes()))"
        out = subprocess.run(
            [str(ROOT / ".venv" / "bin" / "python"), "-c", script],
            env={**self.env, "RAY_ADDRESS": self.address},
            capture_output=True,
            text=True,
            timeout=120,
        )
        if out.returncode != 0 or not out.stdout.strip():
            return 0, out.stderr[-2000:]
        return int(out.stdout.strip().splitlines()[-1]), ""

    def _wait_for_nodes(self, count: int, timeout_s: float = 120) -> None:
        deadline = time.monotonic() + timeout_s
        while (alive := self.alive_nodes())[0] < count:
            assert time.monotonic() < deadline, f"the cluster never had {count} nodes up: {alive[1]}"
            time.sleep(1)

    def stop(self) -> None:
        for node in reversed(self.nodes):
            if node.alive:
                node.kill()
