"""Where jobs are kept: the job queue, the leases of the workers running them, and
the outbox of final callbacks. No Ray here.

One `JobStore` interface, two implementations of the same SQL:

- `SqliteJobStore` (the default): one file, for a single machine.
- `PostgresJobStore` (`jobs.store_url`): for a cluster, where the tracker
  actor may be restarted on any node. Claims lock the row they take with
  `FOR UPDATE SKIP LOCKED`, so concurrent claimers never wait on each other
  nor take the same job.

A job row holds the whole `Job` as JSON, plus the columns the queue is searched
by (status, creation time, lease). The lease columns are the truth for the
lease: renewing one writes only them.
"""

from __future__ import annotations

import logging
import sqlite3
import threading
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from pathlib import Path
from typing import Any, Protocol

from pydantic import ValidationError

from deployments.jobs import Delivery, Job, JobStatus

log = logging.getLogger(__name__)

SCHEMA = (
    """CREATE TABLE IF NOT EXISTS job_queue (
        key TEXT PRIMARY KEY,
        status TEXT NOT NULL,
        created DOUBLE PRECISION NOT NULL,
        worker TEXT,
        lease_until DOUBLE PRECISION,
        data TEXT NOT NULL)""",
    "CREATE INDEX IF NOT EXISTS job_queue_waiting ON job_queue (status, created)",
    """CREATE TABLE IF NOT EXISTS outbox (
        id TEXT PRIMARY KEY,
        next_at DOUBLE PRECISION NOT NULL,
        data TEXT NOT NULL)""",
    "CREATE INDEX IF NOT EXISTS outbox_due ON outbox (next_at)",
)
COLUMNS = "data, worker, lease_until"
# Waiting jobs, and running jobs whose worker stopped renewing its lease (it died).
CLAIMABLE = "status = 'queued' OR (status = 'processing' AND lease_until < ?)"


class JobStore(Protocol):
    def create(self, job: Job) -> tuple[Job, bool]:
        """Store a new job; (it, True), or (the job already under its key, False)."""
        ...

    def get(self, key: str) -> Job | None: ...

    def save(self, job: Job, delivery: Delivery | None = None) -> None:
        """Write the job (and queue `delivery`, in the same transaction)."""
        ...

    def unfinished(self) -> list[Job]: ...

    def count_queued(self) -> int: ...

    def claim(self, worker: str, now: float, lease_until: float) -> Job | None:
        """The oldest claimable job, now `processing` under `worker`'s lease, its attempts counted."""
        ...

    def renew(self, job: Job) -> bool:
        """Write `job` (its new `lease_until`, its progress) if `job.worker` still holds it; False when
        the job is no longer that worker's to run (cancelled, claimed again)."""
        ...

    def due(self, now: float, limit: int) -> list[Delivery]: ...

    def reschedule(self, delivery: Delivery) -> None: ...

    def delivered(self, delivery: Delivery) -> None: ...

    def close(self) -> None: ...


class _SqlJobStore:
    """The queries, written once with `?` placeholders; subclasses own the connection."""

    lock_clause = ""  # what a claim's SELECT adds to lock its row

    def _transaction(self) -> Any:  # a context manager yielding a cursor-like `execute`
        raise NotImplementedError

    def create(self, job: Job) -> tuple[Job, bool]:
        with self._transaction() as sql:
            inserted = sql(
                "INSERT INTO job_queue (key, status, created, worker, lease_until, data) VALUES (?, ?, ?, ?, ?, ?) "
                "ON CONFLICT (key) DO NOTHING",
                (job.key, job.status.value, job.created_at.timestamp(), job.worker, job.lease_until, _json(job)),
            ).rowcount
            if inserted:
                return job, True
            return _job(sql(f"SELECT {COLUMNS} FROM job_queue WHERE key = ?", (job.key,)).fetchone()), False

    def get(self, key: str) -> Job | None:
        with self._transaction() as sql:
            row = sql(f"SELECT {COLUMNS} FROM job_queue WHERE key = ?", (key,)).fetchone()
        return _job(row) if row else None

    def save(self, job: Job, delivery: Delivery | None = None) -> None:
        with self._transaction() as sql:
            sql(
                "UPDATE job_queue SET status = ?, worker = ?, lease_until = ?, data = ? WHERE key = ?",
                (job.status.value, job.worker, job.lease_until, _json(job), job.key),
            )
            if delivery is not None:
                self._put(sql, delivery)

    def unfinished(self) -> list[Job]:
        with self._transaction() as sql:
            rows = sql(
                f"SELECT {COLUMNS} FROM job_queue WHERE status IN (?, ?) ORDER BY created",
                (JobStatus.queued.value, JobStatus.processing.value),
            ).fetchall()
        jobs = []
        for row in rows:
            with suppress(ValidationError):  # unreadable rows are set aside by the next claim
                jobs.append(_job(row))
        return jobs

    def count_queued(self) -> int:
        with self._transaction() as sql:
            return sql("SELECT COUNT(*) FROM job_queue WHERE status = ?", (JobStatus.queued.value,)).fetchone()[0]

    def claim(self, worker: str, now: float, lease_until: float) -> Job | None:
        with self._transaction() as sql:
            while True:
                oldest = f"SELECT key, {COLUMNS} FROM job_queue WHERE {CLAIMABLE} ORDER BY created LIMIT 1"
                row = sql(oldest + self.lock_clause, (now,)).fetchone()
                if row is None:
                    return None
                try:
                    job = _job(row[1:])
                    break
                except ValidationError:  # e.g. stored by another version: set aside, never let it block the queue
                    log.error("job %s cannot be read and is set aside (status 'unreadable')", row[0].partition("/")[2])
                    sql("UPDATE job_queue SET status = 'unreadable' WHERE key = ?", (row[0],))
            job.status, job.worker, job.lease_until = JobStatus.processing, worker, lease_until
            job.attempts += 1
            sql(
                "UPDATE job_queue SET status = ?, worker = ?, lease_until = ?, data = ? WHERE key = ?",
                (job.status.value, worker, lease_until, _json(job), job.key),
            )
            return job

    def renew(self, job: Job) -> bool:
        with self._transaction() as sql:
            return (
                sql(
                    "UPDATE job_queue SET lease_until = ?, data = ? WHERE key = ? AND worker = ? AND status = ?",
                    (job.lease_until, _json(job), job.key, job.worker, JobStatus.processing.value),
                ).rowcount
                == 1
            )

    def due(self, now: float, limit: int) -> list[Delivery]:
        with self._transaction() as sql:
            rows = sql("SELECT data FROM outbox WHERE next_at <= ? ORDER BY next_at LIMIT ?", (now, limit)).fetchall()
        return [Delivery.model_validate_json(r[0]) for r in rows]

    def reschedule(self, delivery: Delivery) -> None:
        with self._transaction() as sql:
            self._put(sql, delivery)

    def delivered(self, delivery: Delivery) -> None:
        with self._transaction() as sql:
            sql("DELETE FROM outbox WHERE id = ?", (delivery.id,))

    @staticmethod
    def _put(sql: Any, delivery: Delivery) -> None:
        sql(
            "INSERT INTO outbox (id, next_at, data) VALUES (?, ?, ?) "
            "ON CONFLICT (id) DO UPDATE SET next_at = excluded.next_at, data = excluded.data",
            (delivery.id, delivery.next_at, delivery.model_dump_json()),
        )


class SqliteJobStore(_SqlJobStore):
    """One SQLite file (WAL). The tracker calls from one worker thread; a lock guards the connection anyway."""

    def __init__(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        self._db = sqlite3.connect(path, check_same_thread=False, isolation_level=None)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=FULL")  # a 202 promises the job is on disk
        self._db.execute("PRAGMA busy_timeout=10000")
        self._lock = threading.Lock()
        with self._transaction() as sql:
            for statement in SCHEMA:
                sql(statement, ())
            _migrate(sql)

    @contextmanager
    def _transaction(self) -> Iterator[Any]:
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")  # a claim's read and write happen under one write lock
            try:
                yield self._db.execute
            except BaseException:
                self._db.execute("ROLLBACK")
                raise
            self._db.execute("COMMIT")

    def close(self) -> None:
        with self._lock:
            self._db.close()


class PostgresJobStore(_SqlJobStore):
    """PostgreSQL through psycopg 3, one connection (the tracker is one actor), reconnected when it breaks."""

    lock_clause = " FOR UPDATE SKIP LOCKED"

    def __init__(self, url: str) -> None:
        import psycopg  # only clusters that configure PostgreSQL need it loaded

        self._psycopg = psycopg
        self._url = url
        self._lock = threading.Lock()
        self._conn: Any = None  # connected on first use: a tracker starts even while the database is down

    def _connection(self) -> Any:
        if self._conn is None or self._conn.closed or self._conn.broken:
            try:
                conn = self._psycopg.connect(self._url, autocommit=True, connect_timeout=10)
            except self._psycopg.Error as e:
                # psycopg's message can quote the URL, password included: never pass it on.
                raise StoreUnavailable(f"cannot connect to the PostgreSQL job store ({type(e).__name__})") from None
            with conn.transaction():
                for statement in SCHEMA:
                    conn.execute(statement)
            self._conn = conn
        return self._conn

    @contextmanager
    def _transaction(self) -> Iterator[Any]:
        with self._lock:
            conn = self._connection()
            with conn.transaction(), conn.cursor() as cursor:

                def execute(query: str, params: tuple) -> Any:
                    return cursor.execute(query.replace("?", "%s"), params)

                yield execute

    def close(self) -> None:
        with self._lock:
            if self._conn is not None:
                self._conn.close()


def open_store(url: str | None, sqlite_path: Path) -> JobStore:
    """PostgreSQL when `url` is given (postgresql://...), else the SQLite file."""
    if url:
        return PostgresJobStore(url)
    return SqliteJobStore(sqlite_path)


class StoreUnavailable(RuntimeError):
    """The job store cannot be reached (the message never holds its URL)."""


def _migrate(sql: Any) -> None:
    """Jobs stored before the queue existed (table `owned_jobs`) move to `job_queue` once. Those still
    unfinished have no stored request: the tracker fails them as `interrupted` when it claims them."""
    if sql("SELECT name FROM sqlite_master WHERE type = 'table' AND name = 'owned_jobs'", ()).fetchone():
        sql(
            "INSERT INTO job_queue (key, status, created, data) SELECT key, status, 0, data FROM owned_jobs "
            "WHERE true ON CONFLICT (key) DO NOTHING",
            (),
        )
        sql("ALTER TABLE owned_jobs RENAME TO owned_jobs_moved", ())


def _json(job: Job) -> str:
    return job.model_dump_json()


def _job(row: tuple) -> Job:
    job = Job.model_validate_json(row[0])
    job.worker, job.lease_until = row[1], row[2]  # the columns are the lease's truth (see renew)
    return job
