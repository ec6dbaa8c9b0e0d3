"""Channels for a fleet of replicas behind a Kubernetes headless Service.

A plain `grpc.insecure_channel("host:port")` uses pick_first: every call of
the channel goes to one replica. `connect()` instead sets up what client-side
load balancing needs (see clients/python/README.md):

- a `dns:///` target, so every A record of the headless name is a backend;
- `round_robin`, so calls rotate over every ready backend;
- client-side health checking, so a replica reporting NOT_SERVING (loading
  its model, or draining after SIGTERM) gets no new calls;
- a retry policy for UNAVAILABLE: a refused call did no work, so the next
  attempt simply goes to another replica;
- keepalive pings, so a silently dead link is noticed in seconds rather than
  after the kernel's TCP timeout;
- a short minimum DNS re-resolution interval, so that when a server's
  max-connection-age closes a connection the client re-resolves at once and
  picks up replicas added by a scale-up;
- optional TLS (with an optional client certificate) and API key.

With `affinity=True` the channel balances with gRPC's `ring_hash` policy on
the `qwen-session-id` request header instead (gRFC A76 `requestHashHeader`):
calls with equal keys go to the same ready replica, and to the next one on the
ring when that replica is unhealthy or gone. Health checking, retries and
keepalive are the same.
"""

from __future__ import annotations

import collections
import json
import os
from collections.abc import Callable, Sequence
from typing import Any

import grpc
from grpc import aio

from .tracing import traceparent_metadata
from .wire import SESSION_METADATA_KEY

SERVICE = "qwen.QwenService"

# grpcio's C-core honours ring_hash's requestHashHeader only with this set;
# without it every keyed call fails INTERNAL "hash attribute not present".
# C-core reads it whenever it parses a ring_hash config (checked with grpcio
# 1.85: setting it after `import grpc` and after other channels exist works),
# so setting it just before building an affinity channel is enough.
RING_HASH_REQUEST_HASH_KEY_ENV = "GRPC_EXPERIMENTAL_RING_HASH_SET_REQUEST_HASH_KEY"

# Three attempts cover one refused call on a draining replica plus one on a
# replica that died between DNS answers, without multiplying load when the
# whole fleet is down (gRPC also throttles retries by its own backoff).
RETRY_POLICY = {
    "maxAttempts": 3,
    "initialBackoff": "0.1s",
    "maxBackoff": "1s",
    "backoffMultiplier": 2,
    "retryableStatusCodes": ["UNAVAILABLE"],
}

Metadata = Sequence[tuple[str, str]]


def load_balancing_config(*, affinity: bool = False) -> dict[str, Any]:
    """round_robin, or ring_hash keyed by the session header."""
    if affinity:
        return {"ring_hash_experimental": {"requestHashHeader": SESSION_METADATA_KEY}}
    return {"round_robin": {}}


def service_config(*, health_check: bool = True, affinity: bool = False) -> dict[str, Any]:
    config: dict[str, Any] = {
        "loadBalancingConfig": [load_balancing_config(affinity=affinity)],
        "methodConfig": [{"name": [{"service": SERVICE}], "retryPolicy": RETRY_POLICY}],
    }
    if health_check:
        # The server reports this name NOT_SERVING while its model loads and
        # from the first moment of a drain.
        config["healthCheckConfig"] = {"serviceName": SERVICE}
    return config


def channel_options(
    *,
    keepalive_seconds: float = 30.0,
    keepalive_timeout_seconds: float = 10.0,
    dns_refresh_seconds: float = 5.0,
    health_check: bool = True,
    affinity: bool = False,
    tls_server_name: str | None = None,
    extra_options: Sequence[tuple[str, Any]] = (),
) -> list[tuple[str, Any]]:
    """Channel arguments for a fleet channel. keepalive_seconds must not be
    below the server's --keepalive-min-ping-interval (10 s by default), or the
    server closes the connection with GOAWAY too_many_pings. affinity=True
    selects ring_hash on the session header (and enables it in C-core)."""
    if affinity:
        os.environ[RING_HASH_REQUEST_HASH_KEY_ENV] = "true"
    options: list[tuple[str, Any]] = [
        ("grpc.service_config", json.dumps(service_config(health_check=health_check, affinity=affinity))),
        ("grpc.enable_retries", 1),
        ("grpc.keepalive_time_ms", int(keepalive_seconds * 1000)),
        ("grpc.keepalive_timeout_ms", int(keepalive_timeout_seconds * 1000)),
        # Keep pinging idle channels too: an edge terminal that calls once a
        # minute should find out about a dead replica before its next call.
        ("grpc.keepalive_permit_without_calls", 1),
        ("grpc.http2.max_pings_without_data", 0),
        # gRPC never polls DNS; it re-resolves when a connection closes, but
        # by default at most every 30 s.
        ("grpc.dns_min_time_between_resolutions_ms", int(dns_refresh_seconds * 1000)),
    ]
    if tls_server_name:
        options.append(("grpc.ssl_target_name_override", tls_server_name))
    # Any other gRPC channel argument (e.g. flow-control or message-size limits).
    return options + list(extra_options)


def target_of(target: str) -> str:
    """`host:port` -> `dns:///host:port`: without a scheme gRPC would still
    resolve via DNS, but being explicit keeps `unix:`/`ipv4:` targets intact
    and documents that every A record becomes a backend."""
    if "://" in target or target.startswith(("unix:", "dns:", "ipv4:", "ipv6:")):
        return target
    return f"dns:///{target}"


def _read_pem(value: bytes | str | os.PathLike | None) -> bytes | None:
    """PEM bytes as given, or the content of a file path."""
    if value is None or isinstance(value, bytes):
        return value
    with open(value, "rb") as handle:
        return handle.read()


def channel_credentials(
    *,
    root_certificates: bytes | str | os.PathLike | None = None,
    client_certificate_chain: bytes | str | os.PathLike | None = None,
    client_private_key: bytes | str | os.PathLike | None = None,
) -> grpc.ChannelCredentials:
    """TLS credentials. Without root_certificates the system's trust store is
    used; the client certificate pair (PEM bytes or file paths) is for mutual TLS."""
    if (client_certificate_chain is None) != (client_private_key is None):
        raise ValueError("client_certificate_chain and client_private_key go together")
    return grpc.ssl_channel_credentials(
        root_certificates=_read_pem(root_certificates),
        private_key=_read_pem(client_private_key),
        certificate_chain=_read_pem(client_certificate_chain),
    )


def call_metadata(api_key: str | None) -> Callable[[], list[tuple[str, str]]]:
    """What every call carries: `authorization: Bearer <key>` if an API key is
    set, and the W3C `traceparent` of the current OpenTelemetry span (computed
    per call, because the current span changes between calls)."""
    static = [("authorization", f"Bearer {api_key}")] if api_key else []

    def metadata() -> list[tuple[str, str]]:
        return static + traceparent_metadata()

    return metadata


def _with_metadata(details: Any, extra: list[tuple[str, str]], factory: Any) -> Any:
    """`details` rebuilt as `factory`, a namedtuple class of grpc's call details, with `extra` metadata."""
    if not extra:
        return details
    fields = {name: getattr(details, name, None) for name in factory._fields}
    fields["metadata"] = list(details.metadata or ()) + extra
    return factory(**fields)


class _SyncCallDetails(
    collections.namedtuple(
        "_SyncCallDetails", ("method", "timeout", "metadata", "credentials", "wait_for_ready", "compression")
    ),
    grpc.ClientCallDetails,  # an abstract class naming these attributes; grpc offers no concrete one
):
    pass


class MetadataInterceptor(grpc.UnaryUnaryClientInterceptor, grpc.UnaryStreamClientInterceptor):
    """Adds call_metadata() to every call of a blocking channel."""

    def __init__(self, metadata: Callable[[], list[tuple[str, str]]]) -> None:
        self._metadata = metadata

    def intercept_unary_unary(self, continuation, client_call_details, request):
        return continuation(_with_metadata(client_call_details, self._metadata(), _SyncCallDetails), request)

    def intercept_unary_stream(self, continuation, client_call_details, request):
        return continuation(_with_metadata(client_call_details, self._metadata(), _SyncCallDetails), request)


class _AsyncUnaryMetadataInterceptor(aio.UnaryUnaryClientInterceptor):
    def __init__(self, metadata: Callable[[], list[tuple[str, str]]]) -> None:
        self._metadata = metadata

    async def intercept_unary_unary(self, continuation, client_call_details, request):
        return await continuation(_with_metadata(client_call_details, self._metadata(), aio.ClientCallDetails), request)


class _AsyncStreamMetadataInterceptor(aio.UnaryStreamClientInterceptor):
    def __init__(self, metadata: Callable[[], list[tuple[str, str]]]) -> None:
        self._metadata = metadata

    async def intercept_unary_stream(self, continuation, client_call_details, request):
        return await continuation(_with_metadata(client_call_details, self._metadata(), aio.ClientCallDetails), request)


def async_metadata_interceptors(metadata: Callable[[], list[tuple[str, str]]]) -> list[aio.ClientInterceptor]:
    """call_metadata() on every call of an asyncio channel. One object per
    call kind: grpc.aio files an interceptor under the first kind it
    implements only, so one class for both would skip streaming calls."""
    return [_AsyncUnaryMetadataInterceptor(metadata), _AsyncStreamMetadataInterceptor(metadata)]


def _credentials(tls: bool, root_certificates, client_certificate_chain, client_private_key):
    wants_tls = tls or any(v is not None for v in (root_certificates, client_certificate_chain, client_private_key))
    if not wants_tls:
        return None
    return channel_credentials(
        root_certificates=root_certificates,
        client_certificate_chain=client_certificate_chain,
        client_private_key=client_private_key,
    )


def fleet_channel(
    target: str,
    *,
    tls: bool = False,
    root_certificates: bytes | str | os.PathLike | None = None,
    client_certificate_chain: bytes | str | os.PathLike | None = None,
    client_private_key: bytes | str | os.PathLike | None = None,
    **options: Any,
) -> grpc.Channel:
    """connect() without the metadata interceptor: for callers that pass
    call_metadata() themselves (QwenClient does, because intercepted unary
    calls do not hand back the response headers that name the replica)."""
    credentials = _credentials(tls, root_certificates, client_certificate_chain, client_private_key)
    args = channel_options(**options)
    if credentials:
        return grpc.secure_channel(target_of(target), credentials, options=args)
    return grpc.insecure_channel(target_of(target), options=args)


def connect(target: str, *, api_key: str | None = None, **options: Any) -> grpc.Channel:
    """A blocking channel for the fleet whose calls carry the API key and
    trace context. TLS is on when `tls=True` or any certificate is given
    (see fleet_channel()); other options go to channel_options()."""
    return grpc.intercept_channel(fleet_channel(target, **options), MetadataInterceptor(call_metadata(api_key)))


def connect_async(
    target: str,
    *,
    api_key: str | None = None,
    tls: bool = False,
    root_certificates: bytes | str | os.PathLike | None = None,
    client_certificate_chain: bytes | str | os.PathLike | None = None,
    client_private_key: bytes | str | os.PathLike | None = None,
    **options: Any,
) -> aio.Channel:
    """connect() for asyncio (grpc.aio)."""
    credentials = _credentials(tls, root_certificates, client_certificate_chain, client_private_key)
    args = channel_options(**options)
    interceptors = async_metadata_interceptors(call_metadata(api_key))
    if credentials:
        return aio.secure_channel(target_of(target), credentials, options=args, interceptors=interceptors)
    return aio.insecure_channel(target_of(target), options=args, interceptors=interceptors)


def session_metadata(session_id: str | None) -> list[tuple[str, str]]:
    """[("qwen-session-id", key)] for a call of a conversation, [] without
    one. The key travels as a header, so it must be printable ASCII."""
    if session_id is None:
        return []
    if not isinstance(session_id, str) or not session_id or not session_id.isascii() or not session_id.isprintable():
        raise ValueError(f"session_id must be a non-empty printable ASCII string, got {session_id!r}")
    return [(SESSION_METADATA_KEY, session_id)]
