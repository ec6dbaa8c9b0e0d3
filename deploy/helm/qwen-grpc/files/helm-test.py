"""`helm test`: health of qwen.QwenService and one greedy Chat through the
regular Service, with the image's own Python and SDK (so it runs on any node
architecture the image does). With API keys on, it sends the first key of
the release's Secret (QWEN_API_KEYS), as every client must.

Environment: TARGET (host:port), CHAT_REQUEST (JSON: messages, max_tokens),
QWEN_API_KEYS (optional, comma-separated). Exit 0 only when both checks pass.
"""

import json
import os
import sys

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from qwen_grpc_client import QwenClient

target = os.environ["TARGET"]
request = json.loads(os.environ["CHAT_REQUEST"])
api_key = os.environ.get("QWEN_API_KEYS", "").split(",")[0].strip() or None
metadata = [("authorization", f"Bearer {api_key}")] if api_key else []

with grpc.insecure_channel(target) as channel:
    reply = health_pb2_grpc.HealthStub(channel).Check(
        health_pb2.HealthCheckRequest(service="qwen.QwenService"), timeout=10, metadata=metadata
    )
status = health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status)
print(f"health of qwen.QwenService at {target}: {status}", flush=True)
if status != "SERVING":
    sys.exit(1)

try:
    with QwenClient(target, timeout=120, api_key=api_key) as client:
        answer = client.chat(request["messages"], max_tokens=request["max_tokens"], temperature=0)
except grpc.RpcError as error:
    sys.exit(f"qwen.QwenService/Chat failed: {error.code().name}: {error.details()}")
print(
    f"chat from {answer.replica or 'unnamed replica'}: {answer.content!r} "
    f"(finish={answer.finish_reason}, completion_tokens={answer.completion_tokens})"
)
if answer.completion_tokens < 1 or answer.finish_reason not in ("stop", "length"):
    sys.exit("the chat produced no tokens")
