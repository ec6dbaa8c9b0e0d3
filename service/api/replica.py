"""Name the replica that served each call, in the response's initial metadata
(`qwen-replica`), so clients balancing over a fleet can tell where a call
went (debugging, spread checks) without server logs.

The header is only sent together with the first response message: sending it
earlier would commit the call, and a committed call that then fails (e.g.
UNAVAILABLE while draining) can no longer be retried by the client on
another replica.
"""

from __future__ import annotations

import inspect
from collections.abc import Awaitable, Callable
from typing import Any

import grpc
from grpc import aio

from qwen_grpc_client.wire import REPLICA_METADATA_KEY


class ReplicaNameInterceptor(aio.ServerInterceptor):
    def __init__(self, replica_name: str, service_prefix: str) -> None:
        self._metadata = ((REPLICA_METADATA_KEY, replica_name),)
        self._prefix = service_prefix

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        handler = await continuation(details)
        if handler is None or not details.method.startswith(self._prefix):
            return handler
        metadata = self._metadata
        if handler.unary_unary:
            inner_unary = handler.unary_unary

            async def unary(request: Any, context: aio.ServicerContext) -> Any:
                response = await inner_unary(request, context)
                await context.send_initial_metadata(metadata)
                return response

            return grpc.unary_unary_rpc_method_handler(unary, handler.request_deserializer, handler.response_serializer)
        if handler.unary_stream and inspect.isasyncgenfunction(handler.unary_stream):
            inner_stream = handler.unary_stream

            async def stream(request: Any, context: aio.ServicerContext) -> Any:
                first = True
                async for response in inner_stream(request, context):
                    if first:
                        await context.send_initial_metadata(metadata)
                        first = False
                    yield response

            return grpc.unary_stream_rpc_method_handler(
                stream, handler.request_deserializer, handler.response_serializer
            )
        return handler
