"""Bearer-token checks for admin and inference routes, in constant time.

Tokens are compared with :func:`hmac.compare_digest` against every configured token and
never appear in logs, status or error messages.
"""

from __future__ import annotations

import hmac
from collections.abc import Iterable

ADMIN, INFERENCE = "admin", "inference"


def bearer(authorization: str | None) -> str | None:
    """The token of an ``Authorization: Bearer <token>`` header, else None."""
    if not authorization:
        return None
    scheme, _, token = authorization.strip().partition(" ")
    return token.strip() or None if scheme.lower() == "bearer" else None


class TokenSet:
    """A set of accepted tokens; empty entries (an unset ``${VAR:-}``) are dropped."""

    def __init__(self, tokens: Iterable[str | None]) -> None:
        self._tokens = [t.encode() for t in tokens if t]

    def __bool__(self) -> bool:
        return bool(self._tokens)

    def __len__(self) -> int:
        return len(self._tokens)

    def accepts(self, token: str | None) -> bool:
        if token is None:
            return False
        candidate = token.encode()
        ok = False
        for known in self._tokens:  # no early exit: the time does not tell which one matched
            ok |= hmac.compare_digest(candidate, known)
        return ok
