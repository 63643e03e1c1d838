"""Callback delivery with httpx: signed, retried, ordered per job. No Ray here.

Delivery follows the Standard Webhooks conventions (https://www.standardwebhooks.com):
2xx is delivered; 429, 5xx, timeouts and connection errors are retried with
exponential backoff and jitter, honouring `Retry-After`; any other status is a
permanent failure. With a secret configured, each request is signed
(`webhook-id` stays the same across retries of one message).
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import hmac
import logging
import random
import time
from collections.abc import Awaitable, Callable

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

    async def deliver(self, url: str, payload: CallbackPayload, message_id: str, attempts: int) -> bool:
        """True once the receiver answered 2xx; False after `attempts` tries or a permanent refusal."""
        body = payload.model_dump_json().encode()
        for attempt in range(1, attempts + 1):
            delay = self._backoff(attempt)
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
                return False
            except httpx.HTTPError as e:  # timeouts, refused connections, DNS...
                log.warning("callback %s to %s failed: %s", message_id, redact(url), type(e).__name__)
            else:
                if response.is_success:
                    return True
                log.warning("callback %s to %s answered %d", message_id, redact(url), response.status_code)
                if response.status_code != 429 and response.status_code < 500:
                    return False  # the receiver refuses it; retrying would not help
                delay = _retry_after(response) or delay
            if attempt < attempts:
                await asyncio.sleep(delay)
        return False

    def _headers(self, message_id: str, body: bytes) -> dict[str, str]:
        timestamp = int(time.time())
        headers = {"content-type": "application/json", "webhook-id": message_id, "webhook-timestamp": str(timestamp)}
        if self._settings.callback_secret is not None:
            secret = self._settings.callback_secret.get_secret_value()
            headers["webhook-signature"] = sign(secret, message_id, timestamp, body)
        return headers

    def _backoff(self, attempt: int) -> float:
        base = self._settings.callback_backoff_s * 2 ** (attempt - 1)
        return min(base, self._settings.callback_backoff_max_s) * random.uniform(0.8, 1.2)

    async def aclose(self) -> None:
        await self._client.aclose()


def _retry_after(response: httpx.Response) -> float | None:
    try:
        return min(float(response.headers["retry-after"]), 300.0)
    except (KeyError, ValueError):
        return None


class CallbackChannel:
    """One job's callbacks, delivered in order by one task.

    Progress callbacks are best effort: one attempt each, and while one is in
    flight only the newest waiting update is kept, so a slow receiver sees
    fewer updates but never an older one after a newer one. The final callback
    comes last, is retried, and nothing follows it.
    """

    def __init__(
        self,
        sender: CallbackSender,
        url: str,
        job_id: str,
        final_attempts: int,
        on_final: Callable[[bool], Awaitable[None]],
    ) -> None:
        self._sender, self._url, self._job_id = sender, url, job_id
        self._final_attempts = final_attempts
        self._on_final = on_final
        self._progress: CallbackPayload | None = None
        self._final: CallbackPayload | None = None
        self._sequence = 0
        self._wake = asyncio.Event()
        self.task = asyncio.create_task(self._run())

    def progress(self, payload: CallbackPayload) -> None:
        if self._final is None:
            self._progress = payload
            self._wake.set()

    def finish(self, payload: CallbackPayload) -> None:
        if self._final is None:
            self._final = payload
            self._wake.set()

    async def _run(self) -> None:
        while True:
            await self._wake.wait()
            self._wake.clear()
            if self._final is not None:
                delivered = await self._send(self._final, self._final_attempts)
                await self._on_final(delivered)
                return
            if self._progress is not None:
                payload, self._progress = self._progress, None
                await self._send(payload, attempts=1)

    async def _send(self, payload: CallbackPayload, attempts: int) -> bool:
        self._sequence += 1
        return await self._sender.deliver(self._url, payload, f"{self._job_id}.{self._sequence}", attempts)
