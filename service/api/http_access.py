"""Access control for the HTTP transport, as ASGI middleware: the HTTP
counterpart of AuthInterceptor and RateLimitInterceptor, using the same
transport-free pieces (service/auth.py, service/ratelimit.py) and, from
qwen-serve, the same limiter instance as gRPC.

- API keys: every /v1/ route needs `Authorization: Bearer <key>` when keys are
  configured -> 401 (OpenAI error shape, code "invalid_api_key") otherwise.
  /health follows --auth-public-health; the static chat page (/) is public
  (it holds no data; its API calls need a key like any other client).
- Rate limit: /v1/ routes, keyed by the key's fingerprint when keys are on,
  else by the client address -> 429 with Retry-After.
- Allowed hosts (--allowed-hosts): a request whose Host header names another
  host gets 400, so a web page that re-points its own DNS name at this
  replica (DNS rebinding) cannot use it from a browser. /health is exempt:
  it reveals nothing, and probes address the pod by IP.
"""

from __future__ import annotations

from typing import Any

from starlette.middleware import Middleware

from ..auth import ApiKeyAuth
from ..config import Settings
from ..errors import InvalidArgument, RateLimited, ServiceError, Unauthenticated, excerpt
from ..ratelimit import RateLimiter, http_peer_key
from .http_server import _error_response, error_detail, retry_after

API_PREFIX = "/v1/"


def _header(scope: dict, name: bytes) -> str | None:
    for key, value in scope.get("headers") or ():
        if key.lower() == name:
            return value.decode("latin-1")
    return None


class AccessMiddleware:
    def __init__(
        self,
        app: Any,
        *,
        auth: ApiKeyAuth | None = None,
        limiter: RateLimiter | None = None,
        public_health: bool = True,
    ) -> None:
        self.app = app
        self.auth = auth
        self.limiter = limiter
        self.public_health = public_health

    def _protected(self, path: str) -> bool:
        return path.startswith(API_PREFIX) or (path == "/health" and not self.public_health)

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        path = scope.get("path", "")
        try:
            client = None
            if self.auth is not None and self._protected(path):
                client = self.auth.authenticate(_header(scope, b"authorization"))
            if self.limiter is not None and path.startswith(API_PREFIX):
                self.limiter.check(client or http_peer_key((scope.get("client") or ("unknown", 0))[0]))
        except ServiceError as exc:
            await self._refuse(exc, scope, receive, send)
            return
        await self.app(scope, receive, send)

    @staticmethod
    async def _refuse(exc: ServiceError, scope: dict, receive: Any, send: Any) -> None:
        status, detail = error_detail(exc)
        headers = None
        if isinstance(exc, Unauthenticated):
            headers = {"WWW-Authenticate": "Bearer"}
        elif isinstance(exc, RateLimited):
            detail = detail.model_copy(update={"code": "rate_limit_exceeded"})
            headers = retry_after(exc)
        await _error_response(status, detail, headers)(scope, receive, send)


def _host_name(host_header: str) -> str:
    """ "Example.com:8000" -> "example.com", "[::1]:8000" -> "::1"."""
    host = host_header.strip().lower()
    if host.startswith("["):
        return host[1:].split("]", 1)[0]
    return host.rsplit(":", 1)[0] if host.count(":") == 1 else host


class AllowedHostsMiddleware:
    """400 for requests to a host not in `allowed` ("*.example.com" allows
    its subdomains); /health answers any host."""

    def __init__(self, app: Any, *, allowed: list[str]) -> None:
        self.app = app
        self.exact = frozenset(name.lower() for name in allowed if not name.startswith("*."))
        self.suffixes = tuple(name[1:].lower() for name in allowed if name.startswith("*."))

    def allows(self, host_header: str | None) -> bool:
        host = _host_name(host_header or "")
        return host in self.exact or (bool(self.suffixes) and host.endswith(self.suffixes))

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http" or scope.get("path") == "/health":
            await self.app(scope, receive, send)
            return
        host = _header(scope, b"host")
        if self.allows(host):
            await self.app(scope, receive, send)
            return
        status, detail = error_detail(InvalidArgument("host", f"{excerpt(host or '')!r} is not an allowed host"))
        await _error_response(status, detail.model_copy(update={"code": "invalid_host"}))(scope, receive, send)


def http_middleware(
    settings: Settings, *, auth: ApiKeyAuth | None = None, limiter: RateLimiter | None = None
) -> list[Middleware]:
    """The access middleware for create_app(middleware=...), outermost
    first: the host check, then keys and rate limit; each only when configured."""
    middleware = []
    if settings.allowed_hosts:
        middleware.append(Middleware(AllowedHostsMiddleware, allowed=settings.allowed_hosts))
    if auth is not None or limiter is not None:
        middleware.append(
            Middleware(AccessMiddleware, auth=auth, limiter=limiter, public_health=settings.auth_public_health)
        )
    return middleware
