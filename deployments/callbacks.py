"""Callback delivery with httpx: signed, retried, ordered per job. No Ray here.

Delivery follows the Standard Webhooks conventions (https://www.standardwebhooks.com):
2xx is delivered; 429, 5xx, timeouts and connection errors are retried on a
schedule of hours (`jobs.callback_retry_delays_s`, with jitter, honouring
`Retry-After`); any other status is a permanent failure. With a secret
configured, each request is signed. Final callbacks wait in the store's outbox
(see the tracker), so their retries survive restarts and keep one `webhook-id`.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import hmac
import logging
import random
import time
import uuid
from dataclasses import dataclass

import httpx

from deployments.jobs import CallbackPayload
from pipeline.config import JobSettings
from pipeline.media import redact
from pipeline.netguard import AddressRefused, NetworkPolicy, post, quiet_http_client_logs

log = logging.getLogger(__name__)


def sign(secret: str, message_id: str, timestamp: int, body: bytes) -> str:
    """The `webhook-signature` header value: v1,<base64 HMAC-SHA256 of "id.timestamp.body">."""
    key = base64.b64decode(secret.removeprefix("whsec_"))
    digest = hmac.new(key, f"{message_id}.{timestamp}.".encode() + body, hashlib.sha256).digest()
    return "v1," + base64.b64encode(digest).decode()


@dataclass(frozen=True)
class Attempt:
    delivered: bool
    retry: bool  # a failure that may succeed later (timeouts, 429, 5xx)
    retry_after: float | None = None  # the receiver's Retry-After, in seconds


class CallbackSender:
    """POSTs payloads to callback URLs through `pipeline.netguard` (public addresses only, no redirects)."""

    def __init__(self, settings: JobSettings, policy: NetworkPolicy, client: httpx.AsyncClient | None = None) -> None:
        self._settings = settings
        self._policy = policy
        # No proxies from the environment, and no kept-alive connections: netguard pins each request
        # to an address, and a pooled TLS connection must not carry a request for another name.
        self._client = client or httpx.AsyncClient(
            timeout=settings.callback_timeout_s,
            follow_redirects=False,
            trust_env=False,
            limits=httpx.Limits(max_keepalive_connections=0),
        )
        quiet_http_client_logs()

    async def send(self, url: str, payload: CallbackPayload, message_id: str) -> Attempt:
        """One delivery attempt."""
        body = payload.model_dump_json().encode()
        try:
            response = await post(
                self._client,
                url,
                content=body,
                headers=self._headers(message_id, body),
                policy=self._policy,
                timeout=self._settings.callback_timeout_s,
            )
        except AddressRefused:  # checked at submission; its DNS now points somewhere it may not go
            log.warning("callback %s to %s refused: not a public address", message_id, redact(url))
            return Attempt(delivered=False, retry=False)
        except httpx.HTTPError as e:  # timeouts, refused connections, DNS...
            log.warning("callback %s to %s failed: %s", message_id, redact(url), type(e).__name__)
            return Attempt(delivered=False, retry=True)
        if response.is_success:
            return Attempt(delivered=True, retry=False)
        log.warning("callback %s to %s answered %d", message_id, redact(url), response.status_code)
        # Any other 4xx: the receiver refuses it, and retrying would not help.
        retry = response.status_code == 429 or response.status_code >= 500
        return Attempt(delivered=False, retry=retry, retry_after=_retry_after(response))

    def _headers(self, message_id: str, body: bytes) -> dict[str, str]:
        timestamp = int(time.time())
        headers = {"content-type": "application/json", "webhook-id": message_id, "webhook-timestamp": str(timestamp)}
        if self._settings.callback_secret is not None:
            secret = self._settings.callback_secret.get_secret_value()
            headers["webhook-signature"] = sign(secret, message_id, timestamp, body)
        return headers

    def next_delay(self, failed_attempts: int, attempt: Attempt) -> float | None:
        """Seconds until the next attempt of a final callback after `failed_attempts` failures;
        None once the schedule (hours long, as Standard Webhooks advises) is spent."""
        delays = self._settings.callback_retry_delays_s
        if not attempt.retry or failed_attempts > len(delays):
            return None
        delay = delays[failed_attempts - 1] * random.uniform(0.8, 1.2)  # jitter: no thundering herd
        return max(delay, attempt.retry_after or 0.0)

    async def aclose(self) -> None:
        await self._client.aclose()


def _retry_after(response: httpx.Response) -> float | None:
    try:
        return min(float(response.headers["retry-after"]), 300.0)
    except (KeyError, ValueError):
        return None


class ProgressChannel:
    """One job's progress callbacks, best effort: one attempt each, in order, by one task.

    While one is in flight only the newest waiting update is kept, so a slow
    receiver sees fewer updates but never an older one after a newer one.
    `close` drops what waits; the final callback (sent from the outbox) waits
    for `closed` so that nothing arrives after it.
    """

    def __init__(self, sender: CallbackSender, url: str, message_prefix: str) -> None:
        self._sender, self._url, self._prefix = sender, url, message_prefix
        self._waiting: CallbackPayload | None = None
        self._open = True
        self._wake = asyncio.Event()
        self.task = asyncio.create_task(self._run())

    def send(self, payload: CallbackPayload) -> None:
        if self._open:
            self._waiting = payload
            self._wake.set()

    def close(self) -> None:
        self._open, self._waiting = False, None
        self._wake.set()

    async def closed(self) -> None:
        self.close()
        await asyncio.shield(self.task)

    async def _run(self) -> None:
        while self._open:
            await self._wake.wait()
            self._wake.clear()
            if self._waiting is not None:
                payload, self._waiting = self._waiting, None
                # A fresh id per message: ids must never repeat, across tracker restarts too.
                await self._sender.send(self._url, payload, f"{self._prefix}.{uuid.uuid4().hex[:16]}")
