"""Name the replica that served each call, in the response's initial metadata
(`qwen-replica`), so clients balancing over a fleet can tell where a call
went (debugging, spread checks) without server logs.

The header is only sent together with the first response message: sending it
earlier would commit the call, and a committed call that then fails (e.g.
UNAVAILABLE while draining) can no longer be retried by the client on
another replica.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import grpc
from grpc import aio

from qwen_grpc_client.wire import REPLICA_METADATA_KEY

from .grpc_handlers import Behavior, Continuation, rewrap


class ReplicaNameInterceptor(aio.ServerInterceptor):
    def __init__(self, replica_name: str, service_prefix: str) -> None:
        self._metadata = ((REPLICA_METADATA_KEY, replica_name),)
        self._prefix = service_prefix

    async def intercept_service(
        self, continuation: Continuation, details: grpc.HandlerCallDetails
    ) -> grpc.RpcMethodHandler:
        handler = await continuation(details)
        if handler is None or not details.method.startswith(self._prefix):
            return handler
        metadata = self._metadata

        def unary(inner: Behavior) -> Behavior:
            async def behavior(request: Any, context: aio.ServicerContext) -> Any:
                response = await inner(request, context)
                await context.send_initial_metadata(metadata)
                return response

            return behavior

        def stream(inner: Behavior) -> Behavior:
            async def behavior(request: Any, context: aio.ServicerContext) -> AsyncIterator[Any]:
                first = True
                async for response in inner(request, context):
                    if first:
                        await context.send_initial_metadata(metadata)
                        first = False
                    yield response

            return behavior

        return rewrap(handler, unary=unary, stream=stream)
