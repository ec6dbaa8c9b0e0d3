"""Runs inside the kind cluster (a Job with the server image) and prints one
JSON line with what happened, for tests/kind/test_kind_e2e.py to assert on.

    python in_cluster_client.py spread  TARGET CALLS
        sequential unary calls; records which replica answered each (the
        SDK reads the `qwen-replica` response header: the pod name)
    python in_cluster_client.py streams TARGET STREAMS SECONDS
        concurrent streams plus a unary loop for SECONDS while the test
        deletes a pod; records every call's final status

Uses the project's SDK (round_robin over the headless Service's A records,
retry of UNAVAILABLE), as a real in-cluster client would.
"""

from __future__ import annotations

import json
import sys
import threading
import time

import grpc

from qwen_grpc_client import QwenClient

PROMPT = [{"role": "user", "content": "Write a haiku about gRPC."}]
# Re-resolve DNS quickly so a replaced pod's address is picked up within the test.
CLIENT_OPTIONS = {"dns_refresh_seconds": 1.0}


def spread(target: str, calls: int) -> dict:
    with QwenClient(target, timeout=60, **CLIENT_OPTIONS) as client:
        replicas = [client.chat(PROMPT, max_tokens=2, temperature=0).replica for _ in range(calls)]
    if not all(replicas):
        raise SystemExit(f"some answers named no replica (no qwen-replica header): {replicas}")
    return {"replicas": replicas}


def streams(target: str, count: int, seconds: float) -> dict:
    outcomes: list[tuple[str, str]] = []
    lock = threading.Lock()

    def record(what: str, status: str) -> None:
        with lock:
            outcomes.append((what, status))

    with QwenClient(target, timeout=300, **CLIENT_OPTIONS) as client:

        def one_stream(index: int) -> None:
            try:
                final = None
                for response in client.stream(PROMPT, max_tokens=200, temperature=0):
                    final = response
                record(f"stream-{index}", "OK" if final is not None and final.is_final else "NO_FINAL_MESSAGE")
            except grpc.RpcError as error:
                record(f"stream-{index}", error.code().name)

        def unary_loop() -> None:
            deadline = time.monotonic() + seconds
            number = 0
            while time.monotonic() < deadline:
                try:
                    client.chat(PROMPT, max_tokens=2, temperature=0, timeout=60)
                    record(f"unary-{number}", "OK")
                except grpc.RpcError as error:
                    record(f"unary-{number}", error.code().name)
                number += 1

        threads = [threading.Thread(target=one_stream, args=(i,)) for i in range(count)]
        threads.append(threading.Thread(target=unary_loop))
        for thread in threads:
            thread.start()
        print("STARTED", flush=True)  # the test deletes a pod after this line
        for thread in threads:
            thread.join()
    return {"outcomes": outcomes}


def main(argv: list[str]) -> int:
    mode, target = argv[1], argv[2]
    if mode == "spread":
        result = spread(target, int(argv[3]))
    elif mode == "streams":
        result = streams(target, int(argv[3]), float(argv[4]))
    else:
        raise SystemExit(f"unknown mode {mode}")
    print("RESULT " + json.dumps(result), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
