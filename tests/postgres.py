"""A real PostgreSQL server for the tests: Debian's `postgresql` package (installed
by `make setup`), a throw-away cluster in a temp dir, listening on loopback only."""

from __future__ import annotations

import glob
import os
import shutil
import subprocess
import time
from pathlib import Path

import psycopg

from tests.serving import free_port


def binaries() -> Path:
    """The directory of initdb/postgres: on PATH, or Debian's versioned directory (not on PATH)."""
    found = shutil.which("initdb")
    if found:
        return Path(found).resolve().parent
    candidates = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"))
    if not candidates:
        raise RuntimeError("PostgreSQL is not installed: run `make setup` (apt-get install postgresql)")
    return Path(candidates[-1]).parent


class PostgresServer:
    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self.port = free_port()
        self.url = f"postgresql://postgres@127.0.0.1:{self.port}/postgres"
        self._proc: subprocess.Popen | None = None

    def start(self) -> None:
        bin_dir = binaries()
        data = self.directory / "data"
        data.mkdir(parents=True)
        as_user = self._as_postgres_user()
        subprocess.run(
            [*as_user, str(bin_dir / "initdb"), "-D", str(data), "-U", "postgres", "-A", "trust", "--no-sync"],
            check=True,
            capture_output=True,
        )
        log = (self.directory / "postgres.log").open("w")
        self._proc = subprocess.Popen(
            [*as_user, str(bin_dir / "postgres"), "-D", str(data), "-h", "127.0.0.1", "-p", str(self.port)]
            + ["-k", str(self.directory), "-c", "fsync=off"],
            stdout=log,
            stderr=subprocess.STDOUT,
        )
        deadline = time.monotonic() + 60
        while True:
            try:
                psycopg.connect(self.url, connect_timeout=2).close()
                return
            except psycopg.OperationalError:
                if time.monotonic() > deadline or self._proc.poll() is not None:
                    raise RuntimeError((self.directory / "postgres.log").read_text()) from None
                time.sleep(0.3)

    def _as_postgres_user(self) -> list[str]:
        """initdb refuses to run as root: as root, run the server as the package's `postgres` user."""
        if os.geteuid() != 0:
            return []
        shutil.chown(self.directory, "postgres")
        for path in self.directory.rglob("*"):
            shutil.chown(path, "postgres")
        return ["runuser", "-u", "postgres", "--"]

    def reset(self) -> None:
        with psycopg.connect(self.url, autocommit=True) as conn:
            conn.execute("DROP TABLE IF EXISTS job_queue, outbox")

    def new_database(self, name: str) -> str:
        """The URL of a new, empty database of its own (for a server under test, apart from `reset`)."""
        with psycopg.connect(self.url, autocommit=True) as conn:
            conn.execute(f'CREATE DATABASE "{name}"')
        return self.url.rsplit("/", 1)[0] + f"/{name}"

    def stop(self) -> None:
        if self._proc is not None and self._proc.poll() is None:
            self._proc.terminate()
            self._proc.wait(timeout=30)
        shutil.rmtree(self.directory, ignore_errors=True)
