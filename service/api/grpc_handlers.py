"""Rewrapping grpc.aio method handlers: the one place that knows the four
handler kinds and the two shapes of a streaming response, so that each
interceptor says only what it does around a call.

A behavior (the function a handler calls) takes (request or request
iterator, context) and is one of:
  unary  - a coroutine returning the response (unary-unary, stream-unary)
  stream - an async generator of responses (unary-stream, stream-stream)
  writer - a coroutine sending responses with context.write() (a streaming
           response in the write style, e.g. health Watch)
"""

from __future__ import annotations

import inspect
from collections.abc import Awaitable, Callable
from typing import Any

import grpc

Continuation = Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]]
Behavior = Callable[..., Any]
Wrapper = Callable[[Behavior], Behavior]

_FACTORIES = {
    "unary": grpc.unary_unary_rpc_method_handler,
    "client_stream": grpc.stream_unary_rpc_method_handler,
    "server_stream": grpc.unary_stream_rpc_method_handler,
    "bidi_stream": grpc.stream_stream_rpc_method_handler,
}
# The request deserializer of the rewrapped handler is the original's.
KEEP: Any = object()


def rpc_kind(handler: grpc.RpcMethodHandler) -> str:
    """ "unary", "client_stream", "server_stream" or "bidi_stream" (the
    grpc_type label of the metrics)."""
    if handler.request_streaming:
        return "bidi_stream" if handler.response_streaming else "client_stream"
    return "server_stream" if handler.response_streaming else "unary"


def _behavior(handler: grpc.RpcMethodHandler) -> Behavior:
    return handler.unary_unary or handler.unary_stream or handler.stream_unary or handler.stream_stream


def rewrap(
    handler: grpc.RpcMethodHandler,
    *,
    unary: Wrapper | None = None,
    stream: Wrapper | None = None,
    writer: Wrapper | None = None,
    streaming_requests: bool = False,
    request_deserializer: Callable[[bytes], Any] | None = KEEP,
) -> grpc.RpcMethodHandler:
    """A handler of the same kind as `handler` whose behavior is the
    wrapper of its shape applied to the original one. Returned as is: a
    handler whose shape has no wrapper, and one with a streaming request
    unless `streaming_requests`."""
    kind = rpc_kind(handler)
    if handler.request_streaming and not streaming_requests:
        return handler
    behavior = _behavior(handler)
    if not handler.response_streaming:
        wrap = unary
    elif inspect.isasyncgenfunction(behavior):
        wrap = stream
    else:
        wrap = writer
    if wrap is None:
        return handler
    deserializer = handler.request_deserializer if request_deserializer is KEEP else request_deserializer
    return _FACTORIES[kind](wrap(behavior), deserializer, handler.response_serializer)
