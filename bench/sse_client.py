"""A tiny asyncio HTTP/1.1 client for Server-Sent Events (what llama-server's
OpenAI-compatible /v1/chat/completions streams), with keep-alive.

Only what the benchmark needs: POST a JSON body, read a chunked (or
Content-Length, or close-delimited) body, yield each SSE event's data as soon
as its bytes arrive. No dependency beyond the standard library, so the client
costs the same few microseconds per event on every run and adds nothing to
the lock file.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator


class HttpError(Exception):
    def __init__(self, status: int, body: bytes) -> None:
        super().__init__(f"HTTP {status}: {body[:500].decode(errors='replace')}")
        self.status = status
        self.body = body


class HttpConnection:
    """One keep-alive connection; requests on it are sequential."""

    def __init__(self, host: str, port: int) -> None:
        self.host = host
        self.port = port
        self._reader: asyncio.StreamReader | None = None
        self._writer: asyncio.StreamWriter | None = None

    async def _ensure(self) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        if self._writer is None or self._writer.is_closing():
            self._reader, self._writer = await asyncio.open_connection(self.host, self.port, limit=1 << 20)
        assert self._reader is not None
        return self._reader, self._writer

    async def close(self) -> None:
        if self._writer is not None:
            self._writer.close()
            try:
                await self._writer.wait_closed()
            except (ConnectionError, OSError):
                pass
            self._writer = None
            self._reader = None

    async def _send(
        self, method: str, path: str, body: bytes | None, accept: str
    ) -> tuple[int, dict[str, str], asyncio.StreamReader]:
        reader, writer = await self._ensure()
        head = [
            f"{method} {path} HTTP/1.1",
            f"Host: {self.host}:{self.port}",
            f"Accept: {accept}",
            "Connection: keep-alive",
        ]
        if body is not None:
            head += ["Content-Type: application/json", f"Content-Length: {len(body)}"]
        writer.write(("\r\n".join(head) + "\r\n\r\n").encode("latin-1") + (body or b""))
        await writer.drain()
        status_line = await reader.readline()
        if not status_line:
            raise ConnectionError("server closed the connection")
        parts = status_line.decode("latin-1").split(None, 2)
        status = int(parts[1])
        headers: dict[str, str] = {}
        while True:
            line = await reader.readline()
            if line in (b"\r\n", b"\n", b""):
                break
            key, _, value = line.decode("latin-1").partition(":")
            headers[key.strip().lower()] = value.strip()
        return status, headers, reader

    async def _body_chunks(self, headers: dict[str, str], reader: asyncio.StreamReader) -> AsyncIterator[bytes]:
        """The response body as it arrives; leaves the connection reusable
        (or closes it when the server asked for that or the body is close-delimited)."""
        keep = headers.get("connection", "").lower() != "close"
        if headers.get("transfer-encoding", "").lower() == "chunked":
            while True:
                size_line = await reader.readline()
                if not size_line:
                    raise ConnectionError("connection closed inside a chunked body")
                size = int(size_line.split(b";", 1)[0].strip(), 16)
                if size == 0:
                    while (await reader.readline()) not in (b"\r\n", b"\n", b""):
                        pass  # trailers
                    break
                data = await reader.readexactly(size)
                await reader.readexactly(2)
                yield data
        elif "content-length" in headers:
            remaining = int(headers["content-length"])
            while remaining > 0:
                data = await reader.read(min(remaining, 65536))
                if not data:
                    raise ConnectionError("connection closed inside the body")
                remaining -= len(data)
                yield data
        else:
            keep = False
            while data := await reader.read(65536):
                yield data
        if not keep:
            await self.close()

    async def request_json(self, method: str, path: str, body: dict | None = None) -> tuple[int, bytes]:
        raw = None if body is None else json.dumps(body).encode()
        try:
            status, headers, reader = await self._send(method, path, raw, "application/json")
        except (ConnectionError, OSError):
            await self.close()
            status, headers, reader = await self._send(method, path, raw, "application/json")
        data = b"".join([chunk async for chunk in self._body_chunks(headers, reader)])
        return status, data

    async def post_sse(self, path: str, body: dict) -> AsyncIterator[str]:
        """POST `body` as JSON and yield the data of every SSE event as it
        arrives (comments and pings are skipped; multi-line data is joined)."""
        raw = json.dumps(body).encode()
        try:
            status, headers, reader = await self._send("POST", path, raw, "text/event-stream")
        except (ConnectionError, OSError):
            # A kept-alive connection the server closed meanwhile: one fresh try.
            await self.close()
            status, headers, reader = await self._send("POST", path, raw, "text/event-stream")
        if status != 200:
            data = b"".join([chunk async for chunk in self._body_chunks(headers, reader)])
            raise HttpError(status, data)
        buffer = b""
        try:
            async for chunk in self._body_chunks(headers, reader):
                buffer += chunk
                if b"\r" in buffer:
                    buffer = buffer.replace(b"\r\n", b"\n")
                while True:
                    end = buffer.find(b"\n\n")
                    if end < 0:
                        break
                    event, buffer = buffer[:end], buffer[end + 2 :]
                    data = [line[5:].lstrip(b" ") for line in event.split(b"\n") if line.startswith(b"data:")]
                    if data:
                        yield b"\n".join(data).decode()
        except BaseException:
            # Abandoned mid-stream (cancelled or failed): the connection is in
            # an unknown state, never reuse it. Closing it also tells the
            # server to stop generating.
            await self.close()
            raise
