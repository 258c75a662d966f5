"""MLflow registry webhooks: verify the signature, refuse stale and replayed deliveries.

MLflow signs ``f"{delivery_id}.{timestamp}.{body}"`` with HMAC-SHA256 and sends
``X-MLflow-Signature: v1,<base64>`` with ``X-MLflow-Delivery-Id`` and
``X-MLflow-Timestamp`` (Unix seconds).
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import time
from dataclasses import dataclass
from typing import Any

from cachetools import TTLCache

MAX_AGE = 300.0  # seconds a delivery may be old (or early, for clock skew)


class WebhookRejected(Exception):
    def __init__(self, status: int, code: str, message: str) -> None:
        super().__init__(message)
        self.status, self.code = status, code


@dataclass(frozen=True)
class WebhookEvent:
    entity: str
    action: str
    model_name: str | None
    data: dict[str, Any]


def signature(secret: str, delivery_id: str, timestamp: str, body: bytes) -> str:
    signed = delivery_id.encode() + b"." + timestamp.encode() + b"." + body
    digest = hmac.new(secret.encode(), signed, hashlib.sha256).digest()
    return "v1," + base64.b64encode(digest).decode()


class WebhookVerifier:
    """Checks one delivery; remembers delivery ids for twice the allowed age."""

    def __init__(self, secret: str) -> None:
        self.secret = secret
        self._seen: TTLCache[str, bool] = TTLCache(maxsize=100_000, ttl=2 * MAX_AGE)

    def verify(self, headers: dict[str, str], body: bytes, now: float | None = None
               ) -> WebhookEvent:
        delivery = headers.get("x-mlflow-delivery-id", "")
        stamp = headers.get("x-mlflow-timestamp", "")
        sent = headers.get("x-mlflow-signature", "")
        if not (delivery and stamp and sent):
            raise WebhookRejected(401, "signature_missing", "signed MLflow webhook expected")
        expected = signature(self.secret, delivery, stamp, body)
        if not any(hmac.compare_digest(expected, s.strip()) for s in sent.split(" ") if s):
            raise WebhookRejected(401, "signature_invalid", "webhook signature does not match")
        try:
            age = (time.time() if now is None else now) - float(stamp)
        except ValueError:
            raise WebhookRejected(401, "timestamp_invalid", "bad webhook timestamp") from None
        if abs(age) > MAX_AGE:
            raise WebhookRejected(401, "timestamp_stale", "webhook timestamp outside 5 minutes")
        if delivery in self._seen:
            raise WebhookRejected(409, "delivery_replayed", "webhook delivery already processed")
        self._seen[delivery] = True
        try:
            payload = json.loads(body)
            data = payload.get("data") or {}
            return WebhookEvent(entity=str(payload.get("entity", "")),
                                action=str(payload.get("action", "")),
                                model_name=data.get("name"), data=data)
        except (ValueError, AttributeError):
            raise WebhookRejected(400, "payload_invalid",
                                  "webhook body is not MLflow JSON") from None
