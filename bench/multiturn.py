"""Multi-turn chat benchmark: what the prefix cache buys.

    python bench/multiturn.py                       # ours with and without the cache, and llama-server
    python bench/multiturn.py --rounds 1 --turns 3 --conversations 2 --max-tokens 16 --out-dir /tmp/bench   # smoke

8 conversations run at once, 6 turns each. Every conversation starts with
the same system prompt (an instruction and a fixed Python module, ~430
tokens), and every turn re-sends the whole history: the system prompt, the
earlier questions and the answers the server actually gave, then a new
question. So late turns carry ~1,000 tokens, almost all of them computed
before (the shared system prompt, the conversation's own earlier turns).

Three servers, one at a time, started fresh for each round and alternated
from round to round (rotating the order) so that drifting background load
hits them alike: ours with the prefix cache (the default), ours with
--no-prefix-caching, and llama-server with 8 slots and its own prompt cache
(`cache_prompt` is on by default; its RAM cache at its default size). Greedy,
repetition penalty 1.0 on both. Reported per server: TTFT p50 of the turns
from the 3rd on (per round, then median and spread over rounds), the same
for all turns, and the prompt tokens each server says it reused. Machine
load (others' busy cores, loadavg) is recorded with every round.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import datetime as dt
import json
import os
import pathlib
import statistics
import sys
import time

ROOT = pathlib.Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))  # harness, for loadgen's OursServer

from bench import prompts  # noqa: E402
from bench.loadgen import (  # noqa: E402
    GGUF_NAME,
    RESULTS_DIR,
    LevelPlan,
    LlamaServer,
    OursServer,
    log,
    machine_info,
    others_cores_now,
    percentile,
)
from service.config import default_cache_dir, default_model_path  # noqa: E402

SHARED_DOCUMENT_LINES = 60  # of prompts.LONG_DOCUMENT: with the instruction, a ~430-token system prompt
QUESTIONS = [
    "What does {name} do?",
    "Is there a bug in {name}? Answer briefly.",
    "Suggest one improvement to {name}.",
    "Write a unit test for {name}.",
    "How would you make {name} thread-safe?",
    "Summarise our discussion of {name} in two sentences.",
]
SUBJECTS = [
    "Item",
    "Reservation",
    "Inventory.reserve",
    "Inventory.release",
    "Inventory.add_stock",
    "Inventory.available",
    "Inventory.restock",
    "Inventory.snapshot",
]


def system_prompt() -> dict[str, str]:
    document = "\n".join(prompts.LONG_DOCUMENT.splitlines()[:SHARED_DOCUMENT_LINES])
    return {"role": "system", "content": f"{prompts.SYSTEM} {prompts.LONG_INSTRUCTION}\n\n```python\n{document}\n```"}


@dataclasses.dataclass
class Turn:
    conversation: int
    turn: int
    ttft: float | None = None
    total: float | None = None
    prompt_tokens: int = 0
    cached_tokens: int | None = None  # as the server reports it (ours: usage; llama-server: timings.cache_n)
    completion_tokens: int = 0
    error: str | None = None


async def converse(client, conversation: int, turns: int, max_tokens: int, timeout: float) -> list[Turn]:
    """One conversation: each turn sends the whole history, with the answers received."""
    messages = [system_prompt()]
    results = []
    await client.connect()
    try:
        for number in range(turns):
            question = QUESTIONS[number % len(QUESTIONS)].format(name=SUBJECTS[conversation % len(SUBJECTS)])
            messages.append({"role": "user", "content": question})
            turn = Turn(conversation, number)
            pieces: list[str] = []
            sent = time.perf_counter()
            try:
                async with asyncio.timeout(timeout):
                    async for kind, value in client.stream(messages, max_tokens):
                        if kind == "piece":
                            if turn.ttft is None:
                                turn.ttft = time.perf_counter() - sent
                            pieces.append(value)
                        else:
                            turn.prompt_tokens, turn.completion_tokens, _, extra = value
                            turn.cached_tokens = (extra or {}).get("cache_n")
            except Exception as exc:  # counted, never fatal
                turn.error = f"{type(exc).__name__}: {exc}"[:300]
            turn.total = time.perf_counter() - sent
            results.append(turn)
            messages.append({"role": "assistant", "content": "".join(pieces)})
    finally:
        await client.close()
    return results


def summarize(turns: list[Turn], late_from: int) -> dict:
    ok = [t for t in turns if t.error is None and t.ttft is not None]
    late = [t for t in ok if t.turn >= late_from]

    def share(items):
        prompt = sum(t.prompt_tokens for t in items)
        cached = sum(t.cached_tokens or 0 for t in items)
        return cached / prompt if prompt else None

    return {
        "requests": len(turns),
        "errors": len(turns) - len(ok),
        "ttft_p50_late": percentile([t.ttft for t in late], 50),
        "ttft_p95_late": percentile([t.ttft for t in late], 95),
        "ttft_p50_all": percentile([t.ttft for t in ok], 50),
        "prompt_tokens_late_mean": statistics.mean(t.prompt_tokens for t in late) if late else None,
        "cached_share_late": share(late),
        "completion_tokens_mean": statistics.mean(t.completion_tokens for t in ok) if ok else None,
    }


async def run_round(server, args) -> dict:
    plan = LevelPlan(
        workload=None,
        concurrency=args.conversations,
        requests_per_stream=args.turns,
        max_tokens=args.max_tokens,
        ctx_per_slot=args.ctx,
    )
    others = others_cores_now()
    server.start(plan)
    try:
        started = time.perf_counter()
        conversations = await asyncio.gather(
            *(
                converse(server.client(), c, args.turns, args.max_tokens, args.request_timeout)
                for c in range(args.conversations)
            )
        )
        wall = time.perf_counter() - started
    finally:
        server.stop()
    turns = [turn for conversation in conversations for turn in conversation]
    return {
        "wall_seconds": wall,
        "others_cores_before": others,
        "loadavg_after": os.getloadavg(),
        "summary": summarize(turns, args.late_from),
        "turns": [dataclasses.asdict(t) for t in turns],
    }


class NamedOurs(OursServer):
    def __init__(self, args, name: str, extra: str) -> None:
        super().__init__(argparse.Namespace(**{**vars(args), "ours_args": extra}))
        self.name = name


def spread(values: list[float]) -> str:
    values = [v for v in values if v is not None]
    if not values:
        return "-"
    return f"{statistics.median(values) * 1000:.0f} ({min(values) * 1000:.0f}–{max(values) * 1000:.0f})"


def report(result: dict) -> str:
    by_server: dict[str, list[dict]] = {}
    for entry in result["rounds"]:
        by_server.setdefault(entry["server"], []).append(entry)
    lines = [
        "| server | late-turn TTFT p50 ms, median (min–max) over rounds | all turns TTFT p50 ms | late-turn prompt tokens | reused share (late) | errors |",
        "|---|---|---|---|---|---|",
    ]
    medians = {}
    for name, entries in by_server.items():
        late = [e["summary"]["ttft_p50_late"] for e in entries]
        medians[name] = statistics.median([v for v in late if v is not None]) if any(late) else None
        share = [e["summary"]["cached_share_late"] for e in entries if e["summary"]["cached_share_late"] is not None]
        tokens = [e["summary"]["prompt_tokens_late_mean"] for e in entries if e["summary"]["prompt_tokens_late_mean"]]
        lines.append(
            f"| {name} | {spread(late)} | {spread([e['summary']['ttft_p50_all'] for e in entries])} | "
            f"{statistics.mean(tokens):.0f} | {f'{statistics.mean(share):.0%}' if share else '-'} | "
            f"{sum(e['summary']['errors'] for e in entries)} |"
        )
    cached = medians.get("ours")
    for other, target in (("ours-no-cache", 0.35), ("llama", 0.6)):
        if cached and medians.get(other):
            lines.append(f"\nours / {other} late-turn TTFT p50: {cached / medians[other]:.2f} (target ≤ {target})")
    loads = [
        f"{e['server']}: {e['others_cores_before']:.2f} cores, loadavg {e['loadavg_after'][0]:.2f}"
        for e in result["rounds"]
    ]
    lines.append("\nLoad before each run (others' busy cores) and 1-min loadavg after: " + "; ".join(loads))
    return "\n".join(lines)


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=default_model_path(), help="default: %(default)s")
    p.add_argument("--conversations", type=int, default=8)
    p.add_argument("--turns", type=int, default=6)
    p.add_argument(
        "--late-from", type=int, default=2, help="0-based turn from which a turn counts as late (default: the 3rd)"
    )
    p.add_argument("--max-tokens", type=int, default=64, help="answer length cap, greedy (default: %(default)s)")
    p.add_argument("--ctx", type=int, default=2048, help="context per slot on both servers (default: %(default)s)")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--servers", default="ours,ours-no-cache,llama", help="default: %(default)s")
    p.add_argument("--ours-args", default="", help="extra qwen-serve flags for both of ours")
    p.add_argument(
        "--llama-server", type=pathlib.Path, help="binary (default: the cached build, bench/llama_server.py)"
    )
    p.add_argument("--gguf", type=pathlib.Path, default=default_cache_dir() / "gguf" / GGUF_NAME)
    p.add_argument(
        "--llama-args", default="", help="extra llama-server flags (default: none, its prompt cache as shipped)"
    )
    p.add_argument("--request-timeout", type=float, default=600.0)
    p.add_argument("--server-timeout", type=float, default=600.0)
    p.add_argument("--out-dir", type=pathlib.Path, default=RESULTS_DIR)
    p.add_argument("--report", type=pathlib.Path, help="print the table of an earlier results JSON and exit")
    args = p.parse_args(argv)
    args.target = args.target_pid = None  # OursServer starts its own
    return args


async def main_async(args, path: pathlib.Path) -> dict:
    servers = []
    for name in args.servers.split(","):
        if name == "ours":
            servers.append(NamedOurs(args, "ours", args.ours_args))
        elif name == "ours-no-cache":
            servers.append(NamedOurs(args, "ours-no-cache", f"{args.ours_args} --no-prefix-caching"))
        elif name == "llama":
            from bench import llama_server

            binary = args.llama_server or llama_server.find_binary()
            if binary is None:
                raise SystemExit("llama-server not built: run `python bench/llama_server.py build`")
            servers.append(LlamaServer(args, binary))
        else:
            raise SystemExit(f"unknown server {name!r}")
    result = {
        "started": dt.datetime.now(dt.UTC).isoformat(),
        "machine": machine_info(),
        "config": {k: str(v) for k, v in vars(args).items()},
        "rounds": [],
    }
    for round_number in range(args.rounds):
        shift = round_number % len(servers)
        for server in servers[shift:] + servers[:shift]:
            log(f"round {round_number + 1}: {server.name}")
            entry = await run_round(server, args)
            entry.update(server=server.name, round=round_number, argv=server.argv)
            s = entry["summary"]
            log(
                f"  late-turn TTFT p50 {s['ttft_p50_late']}, reused share {s['cached_share_late']}, "
                f"errors {s['errors']}, others {entry['others_cores_before']:.2f} cores, wall {entry['wall_seconds']:.1f} s"
            )
            result["rounds"].append(entry)
            path.write_text(json.dumps(result, indent=1))  # after every run: a cut-short benchmark keeps its data
    return result


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.report:
        print(report(json.loads(args.report.read_text())))
        return 0
    args.out_dir.mkdir(parents=True, exist_ok=True)
    path = args.out_dir / f"{dt.datetime.now():%Y%m%d-%H%M%S}-multiturn.json"
    result = asyncio.run(main_async(args, path))
    print(report(result))
    log(f"results: {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
