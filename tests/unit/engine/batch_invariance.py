"""Scenarios for the batch-invariance tests (tiny model here, real model in
tests/real_model): one request's output alone, beside other streams started
before and after it, and as copies in one batch. Not a test module itself."""

from __future__ import annotations

import asyncio
import itertools

from service.engine.engine import Engine
from service.engine.types import GenerationRequest, SamplingParams

_ids = itertools.count()


def request(engine: Engine, text: str, sampling: SamplingParams) -> GenerationRequest:
    ids = tuple(engine.encode_chat([{"role": "user", "content": text}]))
    return GenerationRequest(f"inv-{next(_ids)}", ids, sampling)


async def _stream(engine: Engine, req: GenerationRequest, started: asyncio.Event | None = None) -> str:
    """The request's whole text, then its logprobs if it asked for them;
    `started` is set at its first event."""
    parts, logprobs = [], []
    async for event in engine.generate(req):
        parts.append(event.text)
        if event.logprobs is not None:
            logprobs.append(event.logprobs)
        if started is not None:
            started.set()
    return "".join(parts) + (f"\nlogprobs: {logprobs!r}" if logprobs else "")


async def arrangements(
    engine: Engine, target: tuple[str, SamplingParams], others: list[tuple[str, SamplingParams]], copies: int
) -> dict[str, list[str]]:
    """The target's text in each arrangement (ordered by events, not sleeps):
    alone; beside `others`, half of them decoding before it arrives and half
    arriving once it decodes; as `copies` identical requests in one batch."""
    text, sampling = target
    alone = await _stream(engine, request(engine, text, sampling))

    before, after = others[: len(others) // 2], others[len(others) // 2 :]
    started = [asyncio.Event() for _ in before]
    early = [asyncio.create_task(_stream(engine, request(engine, t, s), e)) for (t, s), e in zip(before, started)]
    for event in started:
        await event.wait()
    target_started = asyncio.Event()
    beside_task = asyncio.create_task(_stream(engine, request(engine, text, sampling), target_started))
    await target_started.wait()
    late = [asyncio.create_task(_stream(engine, request(engine, t, s))) for t, s in after]
    beside = await beside_task
    await asyncio.gather(*early, *late)

    batch = await asyncio.gather(*(_stream(engine, request(engine, text, sampling)) for _ in range(copies)))
    return {"alone": [alone], "beside other streams": [beside], "copies in one batch": list(batch)}


def assert_all_equal(results: dict[str, list[str]]) -> None:
    reference = results["alone"][0]
    assert reference, "the request should produce text"
    for arrangement, texts in results.items():
        for text in texts:
            assert text == reference, f"{arrangement}: {text!r} != alone: {reference!r}"
