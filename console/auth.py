"""Who the console's user is and what they may do.

Locally a user signs in with a personal token (its sha256 in `console.tokens`); the console then
keeps the identity in an HMAC-signed, HttpOnly, SameSite=Strict cookie. Behind an authenticating
proxy (IAP, oauth2-proxy) the identity is the proxy's header, and a request without it is refused.
Every state-changing form carries a CSRF token derived from the identity and a per-process secret.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
from dataclasses import dataclass

from tumorflow.core.config import ConsoleConfig

SESSION_COOKIE = "tumorflow_session"
ROLES = ("viewer", "approver", "rollback")
ANY_MODEL = "*"


class NotSignedIn(Exception):
    """The request carries no identity the console trusts."""


def token_digest(token: str) -> str:
    """What `console.tokens` holds for a token: its sha256, hex."""
    return hashlib.sha256(token.encode()).hexdigest()


@dataclass(frozen=True)
class Authenticator:
    """Identities from tokens or the proxy header, signed sessions and CSRF tokens."""

    config: ConsoleConfig
    secret: bytes

    @classmethod
    def for_config(cls, config: ConsoleConfig) -> Authenticator:
        return cls(config, secrets.token_bytes(32))

    def _sign(self, text: str) -> str:
        return hmac.new(self.secret, text.encode(), hashlib.sha256).hexdigest()

    def user_for_token(self, token: str) -> str | None:
        """The user whose token this is, comparing digests in constant time."""
        digest = token_digest(token)
        for user, expected in self.config.tokens.items():
            if hmac.compare_digest(digest, expected.lower()):
                return user
        return None

    def session_cookie(self, user: str) -> str:
        return f"{user}|{self._sign('session:' + user)}"

    def identity(self, headers: dict[str, str], cookies: dict[str, str]) -> str:
        """The authenticated user of a request, or NotSignedIn."""
        if self.config.auth == "proxy":
            value = headers.get(self.config.proxy_header.lower(), "").strip()
            # IAP writes "accounts.google.com:alice@example.org".
            user = value.rsplit(":", 1)[-1].strip()
            if not user:
                raise NotSignedIn(f"the {self.config.proxy_header} header is missing")
            return user
        user, _, signature = cookies.get(SESSION_COOKIE, "").partition("|")
        if user and hmac.compare_digest(signature, self._sign("session:" + user)):
            return user
        raise NotSignedIn("sign in with your console token")

    def how(self, at: str) -> str:
        """How the console authenticated its user, as a signed decision states it."""
        if self.config.auth == "proxy":
            return f"console: proxy header {self.config.proxy_header} at {at}"
        return f"console: token sign-in (HMAC session cookie) at {at}"

    def csrf_token(self, user: str) -> str:
        return self._sign("csrf:" + user)

    def csrf_valid(self, user: str, token: str) -> bool:
        return bool(token) and hmac.compare_digest(token, self.csrf_token(user))

    def roles(self, user: str, model_name: str) -> set[str]:
        """The user's roles for `model_name`; an approver or a roller-back may also view."""
        granted: set[str] = set()
        for model in (ANY_MODEL, model_name):
            for role, users in self.config.roles.get(model, {}).items():
                if user in users:
                    granted.add(role)
        if granted:
            granted.add("viewer")
        return granted

    def may(self, user: str, role: str, model_name: str) -> bool:
        return role in self.roles(user, model_name)
