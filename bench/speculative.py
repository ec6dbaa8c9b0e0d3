"""Speculative decoding (prompt-lookup drafts), engine only: acceptance rate
and decode speed with and without it, on the real model.

Three prompt kinds (chat, code editing: the answer repeats the prompt's code
with changes, summarisation), B concurrent greedy requests of one kind
(B = 1, 4 by default), the server's default quantization. One engine; speculation is switched on and off between
runs, alternating which goes first each round. Decode tok/s = a request's
completion tokens after the first / (finish - first token), summed over the
B requests. Acceptance = accepted / drafted tokens. Prints one JSON line per
run and a table of medians (with min-max) of the on/off ratio per round.

    python bench/speculative.py [--rounds 3] [--max-tokens 96] [--speculative-tokens 4]

`--acceptance` instead generates each kind once (B=1, greedy: the output is
the same with or without drafts) and replays the drafting on its tokens for
a minimum n-gram of 1, 2 and 3: acceptance and tokens per pass without
timing anything, so it means the same on a busy machine.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import json
import os
import pathlib
import statistics
import sys
import time

REPO = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from service.config import Settings, default_model_path  # noqa: E402
from service.engine import speculative  # noqa: E402
from service.engine.config import QUANTIZATIONS, EngineConfig  # noqa: E402
from service.engine.engine import Engine  # noqa: E402
from service.engine.loader import load_model  # noqa: E402
from service.engine.scheduler import Scheduler  # noqa: E402
from service.engine.types import GenerationRequest, SamplingParams  # noqa: E402

CODE = '''def moving_average(values, window):
    """Mean of each run of `window` consecutive values."""
    if window <= 0:
        raise ValueError("window must be positive")
    result = []
    total = 0.0
    for index, value in enumerate(values):
        total += value
        if index >= window:
            total -= values[index - window]
        if index >= window - 1:
            result.append(total / window)
    return result
'''
ARTICLE = (
    "The city council voted on Tuesday to expand the bicycle lane network by 40 kilometres over the next three "
    "years. The plan, which costs an estimated 12 million euros, connects the northern suburbs to the central "
    "station and adds protected lanes on four major roads. Supporters said the change would cut commuting times "
    "and reduce traffic accidents, pointing to a 2021 pilot on Harbour Street where cyclist injuries fell by a "
    "third. Opponents, including several shop owners, argued that removing parking spaces would hurt local "
    "businesses. The council promised to review parking in the affected areas after the first year and to "
    "publish traffic counts every quarter. Construction of the first section is due to start in the spring."
)
PROMPTS = {
    "chat": "What are three good habits for staying focused while working from home? Explain each briefly.",
    "code-edit": f"Rename `values` to `samples` and `window` to `size` in this function and return the whole "
    f"updated function, nothing else:\n\n```python\n{CODE}```",
    "summarize": f"Summarize this article in three sentences, reusing its wording:\n\n{ARTICLE}",
}


async def run(engine: Engine, prompt: tuple[int, ...], batch: int, sampling: SamplingParams) -> dict:
    stats = engine.stats()

    async def one(index: int):
        final = None
        async for event in engine.generate(GenerationRequest(f"b{index}-{time.monotonic_ns()}", prompt, sampling)):
            final = event
        return final

    finals = await asyncio.gather(*(one(i) for i in range(batch)))
    after = engine.stats()
    tok_s = sum((f.usage.completion_tokens - 1) / (f.timing.finished - f.timing.first_token) for f in finals)
    drafted = after.draft_tokens_total - stats.draft_tokens_total
    accepted = after.accepted_draft_tokens_total - stats.accepted_draft_tokens_total
    return {
        "tok_s": round(tok_s, 2),
        "tokens": finals[0].usage.completion_tokens,
        "drafted": drafted,
        "acceptance": round(accepted / drafted, 3) if drafted else None,
        "accepted_per_token": round(accepted / sum(f.usage.completion_tokens for f in finals), 3),
    }


def replay(prompt: tuple[int, ...], output: tuple[int, ...], tokens: int) -> dict:
    """The passes a request with this greedy output takes at B=1: each
    drafts from prompt + output so far and keeps the matching prefix."""
    done, drafted, accepted, passes = 1, 0, 0, 0  # the first token comes from the prompt's pass
    lookup = speculative.PromptLookup()  # grown as the request's would be, not rebuilt per pass
    lookup.extend(prompt + output[:done])
    while done < len(output):
        draft = lookup.draft(min(tokens, len(output) - done - 1))
        kept = 0
        while kept < len(draft) and draft[kept] == output[done + kept]:
            kept += 1
        lookup.extend(output[done : done + kept + 1])
        drafted, accepted, passes, done = drafted + len(draft), accepted + kept, passes + 1, done + kept + 1
    return {
        "acceptance": round(accepted / drafted, 3) if drafted else None,
        "tokens_per_pass": round((len(output) - 1) / passes, 2),
    }


async def acceptance(
    engine: Engine, prompts: dict[str, tuple[int, ...]], sampling: SamplingParams, speculative_tokens: int
) -> None:
    outputs: dict[str, tuple[int, ...]] = {}
    release = Scheduler._release

    def recording_release(scheduler: Scheduler, seq, *rest, **options) -> None:
        outputs[seq.request.request_id] = tuple(seq.output_ids)
        release(scheduler, seq, *rest, **options)

    Scheduler._release = recording_release  # type: ignore[method-assign,assignment]
    for kind, prompt in prompts.items():
        async for _ in engine.generate(GenerationRequest(kind, prompt, sampling)):
            pass
        row = {"kind": kind, "tokens": len(outputs[kind])}
        for n in (1, 2, 3):
            speculative.DRAFT_MIN_NGRAM = n
            row[f"min_ngram_{n}"] = replay(prompt, outputs[kind], speculative_tokens)
        print(json.dumps(row), flush=True)


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--max-tokens", type=int, default=96)
    parser.add_argument("--speculative-tokens", type=int, default=4)
    parser.add_argument("--batches", default="1,4", help="comma-separated concurrent requests per run")
    parser.add_argument("--acceptance", action="store_true", help="acceptance rates only (see above)")
    parser.add_argument(
        "--repetition-penalty", type=float, default=1.0, help="1.05 is the server's default for requests that omit it"
    )
    parser.add_argument("--quantization", choices=QUANTIZATIONS, default=Settings.model_fields["quantization"].default)
    # On a busy shared machine two OpenMP threads wait on each other in every op: 1 is the stable choice there.
    parser.add_argument("--threads", type=int, default=min(2, os.cpu_count() or 1))
    args = parser.parse_args()
    batches = [int(b) for b in args.batches.split(",")]
    # The server's defaults but batch, context, threads and speculation; no prefix cache (the rounds repeat prompts).
    config = EngineConfig.defaults(
        max_batch_size=max(batches),
        max_waiting=8,
        max_model_len=2048,
        threads=args.threads,
        quantization=args.quantization,
        prefix_cache_bytes=0,
        speculative_tokens=args.speculative_tokens,
        speculative_max_batch=max(batches),
    )
    engine = Engine(lambda _quantization: load_model(default_model_path()), config)
    engine.start()
    scheduler = engine._scheduler  # switched between runs: one model in memory for both arms
    prompts = {kind: tuple(engine.encode_chat([{"role": "user", "content": text}])) for kind, text in PROMPTS.items()}
    sampling = SamplingParams(max_tokens=args.max_tokens, temperature=0.0, repetition_penalty=args.repetition_penalty)
    if args.acceptance:
        await acceptance(engine, prompts, sampling, args.speculative_tokens)
        await engine.shutdown()
        return
    await run(engine, prompts["chat"], 1, dataclasses.replace(sampling, max_tokens=8))  # warm-up
    results: dict[tuple[str, int, int], list[dict]] = {}
    print(json.dumps({"uptime": os.getloadavg(), "quantization": scheduler._runner.quantization}), flush=True)
    for round_index in range(args.rounds):
        for kind, prompt in prompts.items():
            for batch in batches:
                order = (0, args.speculative_tokens) if round_index % 2 == 0 else (args.speculative_tokens, 0)
                for tokens in order:
                    scheduler._speculative_tokens = tokens
                    result = await run(engine, prompt, batch, sampling)
                    results.setdefault((kind, batch, tokens), []).append(result)
                    print(json.dumps({"round": round_index, "kind": kind, "batch": batch, "spec": tokens, **result}))
        print(json.dumps({"uptime": os.getloadavg()}), flush=True)
    await engine.shutdown()
    print("\n| prompt | B | acceptance | tok/s off | tok/s on | on/off ratio: median (min-max) |")
    print("|---|---|---|---|---|---|")
    for kind in prompts:
        for batch in batches:
            off, on = results[(kind, batch, 0)], results[(kind, batch, args.speculative_tokens)]
            ratios = [b["tok_s"] / a["tok_s"] for a, b in zip(off, on)]
            print(
                f"| {kind} | {batch} | {on[0]['acceptance']} | {statistics.median(r['tok_s'] for r in off):.1f} | "
                f"{statistics.median(r['tok_s'] for r in on):.1f} | {statistics.median(ratios):.2f} "
                f"({min(ratios):.2f}-{max(ratios):.2f}) |"
            )


if __name__ == "__main__":
    asyncio.run(main())
