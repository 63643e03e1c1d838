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
_MARK = "alive-nodes: "


class RayNode:
    def __init__(self, args: list[str], env: dict[str, str], log: Path) -> None:
        self._log = log
        self.node_manager_port = free_port()  # names the node in the cluster's node table
        ports = {
            "--node-manager-port": self.node_manager_port,
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
        assert self._wait_for_node(self.head), f"the head node did not start; see {workdir}/head.log"

    def add_node(self, num_cpus: int, resources: dict[str, float], attempts: int = 3) -> RayNode:
        """A node joined to the cluster, once the cluster lists it alive.

        A node started while the machine is busy (a job running on the head, a
        dead node being dealt with) can time out in its own start-up and exit:
        it is started again, as an operator would.
        """
        for attempt in range(1, attempts + 1):
            node = RayNode(
                [f"--address={self.address}", f"--num-cpus={num_cpus}", f"--resources={json.dumps(resources)}"],
                self.env,
                self.workdir / f"node{len(self.nodes)}.{attempt}.log",
            )
            if self._wait_for_node(node):
                self.nodes.append(node)
                return node
            node.kill()
        raise AssertionError(f"no node joined the cluster in {attempts} attempts; see {self.workdir}/node*.log")

    def alive_nodes(self) -> tuple[list[int], str]:
        """Node-manager ports of the nodes alive, as a driver connected to the cluster sees them
        (and its stderr, for failures)."""
        script = (
            "import json, ray; ray.init(); "
            f"print('{_MARK}' + json.dumps([n['NodeManagerPort'] for n in ray.nodes() if n['Alive']]))"
        )
        out = subprocess.run(
            [str(ROOT / ".venv" / "bin" / "python"), "-c", script],
            env={**self.env, "RAY_ADDRESS": self.address},
            capture_output=True,
            text=True,
            timeout=120,
        )
        # Ray prints its own warnings to stdout too (lagging heartbeats on a busy
        # machine), before or after ours: the answer is the marked line.
        answers = [line[len(_MARK) :] for line in out.stdout.splitlines() if line.startswith(_MARK)]
        if out.returncode != 0 or not answers:
            return [], (out.stdout + out.stderr)[-2000:]
        return json.loads(answers[-1]), ""

    def _wait_for_node(self, node: RayNode, timeout_s: float = 120) -> bool:
        """True once `node` is alive in the cluster; False if its process exits first."""
        deadline = time.monotonic() + timeout_s
        while node.alive:
            alive, why = self.alive_nodes()
            if node.node_manager_port in alive:
                return True
            assert time.monotonic() < deadline, f"node not up after {timeout_s} s: {why}"
            time.sleep(1)
        return False

    def stop(self) -> None:
        for node in reversed(self.nodes):
            if node.alive:
                node.kill()
