"""API-key authentication, independent of the transport.

Keys come from Settings.api_keys (QWEN_API_KEYS, comma-separated) and/or
Settings.api_keys_file (one per line; a mounted Kubernetes Secret). Any key
configured turns authentication on; configuring a source that yields no key
is a startup error (never silently open). Clients send
`authorization: Bearer <key>` (gRPC metadata or HTTP header).

Comparison is constant-time: the presented key and every configured key are
hashed to SHA-256 and compared with hmac.compare_digest against all keys, so
neither the position of a mismatch nor the length of a key nor which key
matched shows in the timing. Keys are never logged; a caller is identified
by a short fingerprint of its key (for rate limiting and logs).
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import pathlib

from .config import ConfigError, Settings
from .errors import Unauthenticated

_LOG = logging.getLogger(__name__)

MIN_RECOMMENDED_KEY_LENGTH = 16


def _digest(value: str) -> bytes:
    return hashlib.sha256(value.encode("utf-8", "surrogatepass")).digest()


def fingerprint(key: str) -> str:
    """A non-secret name for a key: 'key-' + 8 hex digits of its SHA-256."""
    return "key-" + _digest(key).hex()[:8]


def read_keys_file(path: str | pathlib.Path) -> list[str]:
    keys = []
    for line in pathlib.Path(path).read_text(encoding="utf-8").splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            keys.append(line)
    return keys


def bearer_token(authorization: str | None) -> str | None:
    """The key of an `authorization` value "Bearer <key>" (scheme in any case), else None."""
    scheme, _, token = (authorization or "").strip().partition(" ")
    if scheme.lower() != "bearer":
        return None
    return token.strip() or None


class ApiKeyAuth:
    def __init__(self, keys: list[str]) -> None:
        if not keys:
            raise ConfigError("API key authentication is configured but no key was found")
        if any(any(ch.isspace() for ch in key) for key in keys):
            raise ConfigError("an API key contains whitespace")
        short = sum(len(key) < MIN_RECOMMENDED_KEY_LENGTH for key in keys)
        if short:
            _LOG.warning("%d API key(s) shorter than %d characters", short, MIN_RECOMMENDED_KEY_LENGTH)
        self._digests = [(_digest(key), fingerprint(key)) for key in dict.fromkeys(keys)]

    @classmethod
    def from_settings(cls, settings: Settings) -> ApiKeyAuth | None:
        """None when authentication is off (no key source configured)."""
        if not settings.auth_enabled:
            return None
        keys = list(settings.api_keys)
        if settings.api_keys_file:
            try:
                keys += read_keys_file(settings.api_keys_file)
            except (OSError, UnicodeDecodeError) as exc:
                raise ConfigError(f"cannot read api_keys_file: {exc}") from exc
        auth = cls(keys)
        _LOG.info("API key authentication on (%d key(s))", len(auth._digests))
        return auth

    def identify(self, presented: str | None) -> str | None:
        """The fingerprint of the matching key, or None. Constant-time in
        the presented value and in which key matches."""
        if not presented:
            return None
        digest = _digest(presented)
        found = None
        for known, name in self._digests:
            if hmac.compare_digest(digest, known):
                found = name  # no early exit: every key is compared
        return found

    def authenticate(self, authorization: str | None) -> str:
        """Check an `authorization` header value ("Bearer <key>"); return the
        caller's key fingerprint or raise Unauthenticated."""
        if not authorization:
            raise Unauthenticated("missing API key: send `authorization: Bearer <key>`")
        token = bearer_token(authorization)
        if token is None:
            raise Unauthenticated("malformed authorization: expected `Bearer <key>`")
        identity = self.identify(token)
        if identity is None:
            raise Unauthenticated("invalid API key")
        return identity
