"""Live job events: what `GET /jobs/{job_id}/events` streams as server-sent events.

The tracker publishes every change of a job (queued, started, each progress
update, its end) to an `EventFeed`; a stream asks the feed for the events
after the last one it sent, waiting for the next when there is none. Event ids
are `<feed>-<n>`: `n` counts the job's events, and `<feed>` names this feed, so
a client resuming with a `Last-Event-ID` from before a tracker restart (whose
counts began again) gets what the new feed has, not a wait for a number that
will never come. No Ray here.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections import OrderedDict, deque
from dataclasses import dataclass, field

from pydantic import BaseModel

from deployments.jobs import JobView

KEPT_PER_JOB = 256  # a job's events kept for resuming streams (progress is thinned upstream)
KEPT_JOBS = 1000  # jobs whose events are kept; the oldest finished ones go first
_FIELDS = set(JobView.model_fields) - {"result"}  # a stream tells the state; the result is fetched once


def _without_result(job: JobView) -> JobView:
    return JobView.model_validate(job.model_dump(include=_FIELDS))


class JobEvent(BaseModel):
    id: str
    event: str = ""  # "progress", or the final status: "completed", "failed", "cancelled"
    data: JobView

    def encode(self) -> str:
        """The event in the text/event-stream wire format."""
        data = self.data.model_dump_json(exclude={"result"})
        return f"id: {self.id}\nevent: {self.event}\ndata: {data}\n\n"


@dataclass
class _JobFeed:
    events: deque[JobEvent] = field(default_factory=lambda: deque(maxlen=KEPT_PER_JOB))
    count: int = 0
    changed: asyncio.Event = field(default_factory=asyncio.Event)


class EventFeed:
    def __init__(self) -> None:
        self.name = uuid.uuid4().hex[:8]
        self._jobs: OrderedDict[str, _JobFeed] = OrderedDict()

    def publish(self, key: str, job: JobView) -> None:
        feed = self._jobs.get(key)
        if feed is None:
            feed = self._jobs[key] = _JobFeed()
            self._forget_old()
        self._jobs.move_to_end(key)
        feed.count += 1
        name = job.status.value if job.status.final else "progress"
        feed.events.append(JobEvent(id=f"{self.name}-{feed.count}", event=name, data=_without_result(job)))
        feed.changed.set()
        feed.changed = asyncio.Event()  # the next wait is for the next change

    async def after(
        self, key: str, current: JobView, last_id: str | None, wait_s: float
    ) -> tuple[list[JobEvent], bool]:
        """The events of job `key` after `last_id` (waiting up to `wait_s` for one when there are
        none), and whether the client then has the job's final event.

        `current` is the job as the store has it: when the feed cannot tell what
        the client missed (the job ended before this feed started, or its events
        were dropped), the client gets the current state as one event, unless
        that is the event it has.
        """
        deadline = time.monotonic() + wait_s
        while True:
            feed = self._jobs.get(key)
            events = self._unseen(feed, last_id)
            if events is None:
                snapshot = self._snapshot(feed, current)
                if snapshot.id != last_id:
                    return [snapshot], snapshot.event != "progress"
                if current.status.final:
                    return [], True
                events = []
            if events:
                return events, events[-1].event != "progress"
            if feed is not None and feed.events and feed.events[-1].event != "progress":
                return [], True  # the client has the end already
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return [], False
            if feed is None:
                feed = self._jobs[key] = _JobFeed()  # something to wait on
            try:
                await asyncio.wait_for(feed.changed.wait(), remaining)
            except TimeoutError:
                return [], False

    def _unseen(self, feed: _JobFeed | None, last_id: str | None) -> list[JobEvent] | None:
        """Events after `last_id`; None when they cannot be told (unknown id, or nothing kept)."""
        if feed is None or not feed.events:
            return None
        if last_id is None:
            return list(feed.events)
        name, _, number = last_id.partition("-")
        if name != self.name or not number.isdigit():
            return None
        seen = int(number)
        oldest = int(feed.events[0].id.rpartition("-")[2])
        if seen < oldest - 1:
            return None  # some were dropped since: start from the current state
        return [e for e in feed.events if int(e.id.rpartition("-")[2]) > seen]

    def _snapshot(self, feed: _JobFeed | None, current: JobView) -> JobEvent:
        name = current.status.value if current.status.final else "progress"
        number = feed.count if feed else 0
        return JobEvent(id=f"{self.name}-{number}", event=name, data=_without_result(current))

    def _forget_old(self) -> None:
        """Drop the feeds of the oldest-touched jobs past KEPT_JOBS (a finished job's resumes then get
        its state from the store)."""
        while len(self._jobs) > KEPT_JOBS:
            self._jobs.popitem(last=False)
