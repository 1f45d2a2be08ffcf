"""Bearer tokens: made once, shown once, stored only as their SHA-256.

A token maps to a user and a role. A user sees, cancels and retries only their own jobs; an
admin sees and changes all of them and may pause the queue.
"""

from __future__ import annotations

import hashlib
import re
import secrets
import time
from dataclasses import dataclass

from service.store import JobStore

USER, ADMIN = "user", "admin"
ROLES = (USER, ADMIN)
_USER_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._@-]{0,127}")


class AuthError(Exception):
    """A missing, malformed or unknown token."""


@dataclass(frozen=True)
class Principal:
    user: str
    role: str

    @property
    def is_admin(self) -> bool:
        return self.role == ADMIN

    def may_see(self, owner: str) -> bool:
        return self.is_admin or owner == self.user


def digest(token: str) -> str:
    # Tokens are 256 random bits, so a fast hash is enough: there is nothing to brute-force.
    return hashlib.sha256(token.encode()).hexdigest()


def check_user(user: str, role: str = USER) -> None:
    """ValueError unless ``user`` and ``role`` are valid for a token."""
    if not _USER_NAME.fullmatch(user):
        raise ValueError(
            f"invalid user name {user!r}: use letters, digits and . _ @ - (at most 128)"
        )
    if role not in ROLES:
        raise ValueError(f"invalid role {role!r}: one of {', '.join(ROLES)}")


def new_token() -> str:
    return "ssp_" + secrets.token_urlsafe(32)


def create_token(store: JobStore, user: str, role: str = USER, token: str | None = None) -> str:
    """A new token for ``user`` (``token`` if given); the store keeps its hash, the caller
    must keep the token."""
    check_user(user, role)
    token = token or new_token()
    store.add_token(digest(token), user, role)
    return token


def _bearer(authorization: str | None) -> str:
    if not authorization:
        raise AuthError("missing bearer token (Authorization: Bearer <token>)")
    scheme, _, token = authorization.partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        raise AuthError("malformed Authorization header: expected 'Bearer <token>'")
    return token.strip()


def _principal_of(store: JobStore, token_digest: str) -> Principal:
    found = store.token(token_digest)
    if found is None:
        raise AuthError("unknown or revoked token")
    return Principal(*found)


def authenticate(store: JobStore, authorization: str | None) -> Principal:
    """The principal behind an ``Authorization: Bearer <token>`` header."""
    return _principal_of(store, digest(_bearer(authorization)))


class Authenticator:
    """``authenticate`` for a server's requests, remembering each known token's principal
    for ``remember_s``: a revoked token still works that long in each API process. Its
    SELECT cost a quarter of a submit's time on PostgreSQL. Unknown tokens are looked up
    every time."""

    def __init__(self, store: JobStore, remember_s: float = 5.0) -> None:
        self.store = store
        self.remember_s = remember_s
        self._known: dict[str, tuple[Principal, float]] = {}  # digest -> (principal, until)

    def __call__(self, authorization: str | None) -> Principal:
        token_digest = digest(_bearer(authorization))
        now = time.monotonic()
        known = self._known.get(token_digest)
        if known is not None and now < known[1]:
            return known[0]
        principal = _principal_of(self.store, token_digest)
        if len(self._known) > 10_000:  # tokens are few; forget them all rather than grow
            self._known.clear()
        self._known[token_digest] = (principal, now + self.remember_s)
        return principal
