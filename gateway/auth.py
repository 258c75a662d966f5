"""Bearer-token checks for admin and inference routes, in constant time.

Tokens are compared with :func:`hmac.compare_digest` against every configured token and
never appear in logs, status or error messages.
"""

from __future__ import annotations

import hmac
from collections.abc import Iterable


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


class InferencePolicy:
    """Who may call an endpoint's model routes.

    ``auth.api_keys`` set: a key is needed, except on ``public: true`` endpoints; an
    endpoint with its own ``api_keys`` accepts those instead. No keys anywhere: open.
    """

    def __init__(self, api_keys: Iterable[str | None],
                 endpoints: Iterable[tuple[tuple[str, str], bool, list[str | None] | None]]
                 ) -> None:
        self.default = TokenSet(api_keys)
        self._rules: dict[tuple[str, str], TokenSet | None] = {}
        for key, public, own in endpoints:
            if public:
                self._rules[key] = None
            elif own is not None and TokenSet(own):
                self._rules[key] = TokenSet(own)

    @property
    def open(self) -> bool:
        return not self.default and all(r is None for r in self._rules.values())

    def allows(self, key: tuple[str, str], authorization: str | None) -> bool:
        tokens = self._rules.get(key, self.default)
        if tokens is None or not tokens:
            return True
        return tokens.accepts(bearer(authorization))
