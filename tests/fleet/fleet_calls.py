"""Client-side load generators for the fleet tests: a loop of unary calls and
a deliberately slow stream reader. Both are bounded in count and time."""

from __future__ import annotations

import dataclasses
import threading
import time
from collections.abc import Sequence

import grpc

from qwen_grpc_client import QwenClient

PROMPT = [{"role": "user", "content": "Stream tokens over gRPC to the edge."}]

# A slow reader's small HTTP/2 window: with BDP probing off and 1 KiB of
# lookahead the server can only send about a kilobyte ahead of what the
# client has read, so a stream lasts as long as the client takes to read it
# (like an edge terminal on a slow link), however fast the tiny model is.
SLOW_READER_CHANNEL_ARGS = [("grpc.http2.bdp_probe", 0), ("grpc.http2.lookahead_bytes", 1024)]
# Such a reader falls far behind the tiny model, so servers in these tests
# buffer a whole 600-token SlowStream for it instead of ending it as a slow
# consumer (--max-buffered-tokens, 256 by default).
SLOW_READER_SERVER_ARGS = ("--max-buffered-tokens", "1000")


@dataclasses.dataclass
class CallRecord:
    started: float
    ended: float
    replica: str = ""
    error: grpc.RpcError | None = None
    session_id: str | None = None


class UnaryLoop(threading.Thread):
    """Sequential short unary calls until stop() (at most max_calls, at most
    max_seconds), recording where each went and how it ended. With
    session_ids, call n carries session_ids[n % len(session_ids)]."""

    def __init__(
        self,
        client: QwenClient,
        *,
        timeout: float = 10.0,
        pause: float = 0.02,
        max_calls: int = 1000,
        max_seconds: float = 60.0,
        session_ids: Sequence[str] = (),
    ) -> None:
        super().__init__(daemon=True)
        self.client, self.timeout, self.pause = client, timeout, pause
        self.session_ids = list(session_ids)
        self.max_calls, self.max_seconds = max_calls, max_seconds
        self.records: list[CallRecord] = []
        self._halt = threading.Event()

    def run(self) -> None:
        deadline = time.monotonic() + self.max_seconds
        while not self._halt.is_set() and len(self.records) < self.max_calls and time.monotonic() < deadline:
            started = time.monotonic()
            session_id = self.session_ids[len(self.records) % len(self.session_ids)] if self.session_ids else None
            try:
                result = self.client.chat(PROMPT, max_tokens=4, timeout=self.timeout, session_id=session_id)
                self.records.append(
                    CallRecord(started, time.monotonic(), replica=result.replica, session_id=session_id)
                )
            except grpc.RpcError as error:
                self.records.append(CallRecord(started, time.monotonic(), error=error, session_id=session_id))
            self._halt.wait(self.pause)

    def stop(self) -> list[CallRecord]:
        self._halt.set()
        self.join(self.timeout + 5)
        assert not self.is_alive(), "unary loop did not stop"
        return self.records

    def served_by(self, replica: str, after: float) -> list[CallRecord]:
        return [r for r in self.records if r.replica == replica and r.started > after]

    def failures(self) -> list[str]:
        return [f"{r.error.code().name}: {r.error.details()}" for r in self.records if r.error is not None]

    def served_since(self, since: float) -> set[str]:
        return {r.replica for r in self.records if r.error is None and r.started >= since}

    def replicas_by_session(self, since: float = 0.0, until: float = float("inf")) -> dict[str, set[str]]:
        """session id -> every replica that answered one of its calls started in [since, until)."""
        placement: dict[str, set[str]] = {}
        for record in self.records:
            if record.error is None and record.session_id is not None and since <= record.started < until:
                placement.setdefault(record.session_id, set()).add(record.replica)
        return placement


class SlowStream(threading.Thread):
    """One ChatStream read with a pause after every message."""

    def __init__(self, client: QwenClient, *, max_tokens: int, pause: float = 0.01, timeout: float = 30.0) -> None:
        super().__init__(daemon=True)
        self.client, self.max_tokens, self.pause, self.timeout = client, max_tokens, pause, timeout
        self.replica = ""
        self.replica_known = threading.Event()
        self.messages = 0
        self.final = None
        self.error: grpc.RpcError | None = None
        self.started = self.ended = 0.0

    def run(self) -> None:
        self.started = time.monotonic()
        stream = self.client.stream(PROMPT, max_tokens=self.max_tokens, temperature=0, timeout=self.timeout)
        try:
            for response in stream:
                if not self.replica_known.is_set():
                    self.replica = stream.replica()
                    self.replica_known.set()
                self.messages += 1
                if response.is_final:
                    self.final = response
                time.sleep(self.pause)
        except grpc.RpcError as error:
            self.error = error
        finally:
            self.ended = time.monotonic()
            self.replica_known.set()

    def wait_replica(self, timeout: float = 15.0) -> str:
        assert self.replica_known.wait(timeout), "stream got no first message"
        assert self.replica, f"stream failed before its first message: {self.error}"
        return self.replica

    def finish(self, timeout: float = 40.0) -> SlowStream:
        self.join(timeout)
        assert not self.is_alive(), "stream hangs"
        return self
