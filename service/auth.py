"""Bearer tokens: made once, shown once, stored only as their SHA-256.

A token maps to a user and a role. A user sees, cancels and retries only their own jobs; an
admin sees and changes all of them and may pause the queue.
"""

from __future__ import annotations

import hashlib
import re
import secrets
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


def authenticate(store: JobStore, authorization: str | None) -> Principal:
    """The principal behind an ``Authorization: Bearer <token>`` header."""
    if not authorization:
        raise AuthError("missing bearer token (Authorization: Bearer <token>)")
    scheme, _, token = authorization.partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        raise AuthError("malformed Authorization header: expected 'Bearer <token>'")
    found = store.token(digest(token.strip()))
    if found is None:
        raise AuthError("unknown or revoked token")
    return Principal(*found)
