"""Multi-turn conversations over a 3-replica fleet: conversation affinity
(the SDK's session_id=, ring_hash on qwen-session-id) vs round_robin.

    python bench/fleet_affinity.py                       # real model, 3 replicas, ~3-5 min
    python bench/fleet_affinity.py --server-args "--some-flag"   # e.g. the prefix cache settings
    python bench/fleet_affinity.py --model /tmp/tiny --conversations 2 --turns 3 --rounds 1   # smoke

Three replicas of qwen-serve run on 127.0.0.2-4 (one process each, started
here, --threads 1) behind one `ipv4:` target with the SDK's channel settings,
so both modes balance exactly as they would over a headless Service. In each
run, --conversations conversations go at once (4: not a multiple of the
replica count, or round_robin over lockstep turns keeps each conversation on
one replica by accident); each has --turns turns: the
first user message carries a ~600-token document, later ones a short
follow-up, and every answer (--max-tokens, greedy) joins the history, so turn
n's prompt is turn n-1's prompt plus two short messages. The two modes use the
same QwenClient and differ only in session_id=; runs alternate
affinity/round_robin (the first mode swaps every round) and every
conversation of every run starts with a distinct line, so no run can reuse
another's cache.

The figure of merit is the late-turn TTFT p50 (turns in the second half of a
conversation): a replica that keeps a conversation's earlier turns cached
(a prefix cache) only prefills the new messages there, which only affinity
lets it do. Without such a cache both modes prefill everything and should be
about equal. Target (issue #12): affinity <= 0.5x round_robin.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import pathlib
import shlex
import statistics
import sys
import threading
import time

ROOT = pathlib.Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))
sys.path.insert(0, str(ROOT / "clients" / "python"))

from harness import ServerProcess  # noqa: E402

from bench import prompts  # noqa: E402
from bench.loadgen import log, percentile  # noqa: E402
from qwen_grpc_client import QwenClient  # noqa: E402
from service.config import default_model_path  # noqa: E402

RESULTS_DIR = ROOT / "bench" / "results"
REPLICA_HOSTS = ("127.0.0.2", "127.0.0.3", "127.0.0.4")
MODES = ("affinity", "round_robin")
TARGET_RATIO = 0.5
FOLLOW_UPS = [
    "Which function has the most serious bug? Answer in one sentence.",
    "How would you test that function?",
    "Name one risky line and say why.",
    "Suggest a better name for the main class.",
    "Which part would you refactor first?",
    "What would you log in production?",
    "Summarise your review in one sentence.",
]


def document(lines: int) -> str:
    return "\n".join(prompts.LONG_DOCUMENT.splitlines()[:lines])


def first_message(doc_lines: int) -> str:
    return f"{prompts.LONG_INSTRUCTION}\n\n```python\n{document(doc_lines)}\n```"


def cached_prompt_tokens(usage) -> int | None:
    """Prompt tokens the replica took from its prefix cache; None from servers
    whose Usage has no such field."""
    if "cached_prompt_tokens" not in usage.DESCRIPTOR.fields_by_name:
        return None
    return usage.cached_prompt_tokens


class Conversation(threading.Thread):
    """One conversation's turns, back to back; TTFT = send -> first content."""

    def __init__(self, client: QwenClient, name: str, session_id: str | None, args: argparse.Namespace) -> None:
        super().__init__(daemon=True)
        self.client, self.name, self.session_id, self.args = client, name, session_id, args
        self.turns: list[dict] = []
        self.error: str | None = None

    def run(self) -> None:
        # The first line makes every conversation of every run distinct.
        history = [
            {"role": "system", "content": f"{self.name}. {prompts.SYSTEM}"},
            {"role": "user", "content": first_message(self.args.doc_lines)},
        ]
        try:
            for turn in range(self.args.turns):
                if turn:
                    history.append({"role": "user", "content": FOLLOW_UPS[(turn - 1) % len(FOLLOW_UPS)]})
                started = time.monotonic()
                ttft, answer, final = None, [], None
                with self.client.stream(
                    history,
                    temperature=0,
                    max_tokens=self.args.max_tokens,
                    session_id=self.session_id,
                    timeout=self.args.timeout,
                ) as stream:
                    for message in stream:
                        if ttft is None and message.content:
                            ttft = time.monotonic() - started
                        answer.append(message.content)
                        if message.is_final:
                            final = message
                    replica = stream.replica()
                history.append({"role": "assistant", "content": "".join(answer)})
                self.turns.append(
                    {
                        "turn": turn + 1,
                        "ttft": ttft,
                        "total": time.monotonic() - started,
                        "replica": replica,
                        "prompt_tokens": final.usage.prompt_tokens,
                        "completion_tokens": final.usage.completion_tokens,
                        "cached_prompt_tokens": cached_prompt_tokens(final.usage),
                    }
                )
        except Exception as error:  # recorded and reported: a failed turn invalidates the run
            self.error = f"{type(error).__name__}: {error}"


def run_mode(client: QwenClient, mode: str, round_number: int, args: argparse.Namespace) -> dict:
    conversations = []
    for index in range(args.conversations):
        name = f"Conversation {round_number}-{mode}-{index}"
        conversations.append(Conversation(client, name, name if mode == "affinity" else None, args))
    started = time.monotonic()
    for conversation in conversations:
        conversation.start()
    for conversation in conversations:
        conversation.join(args.timeout * args.turns)
    errors = [c.error for c in conversations if c.error] + [f"{c.name} hangs" for c in conversations if c.is_alive()]
    turns = [t | {"conversation": c.name} for c in conversations for t in c.turns]
    late_from = args.turns // 2 + 1
    late_turns = [t for t in turns if t["turn"] >= late_from]
    late = [t["ttft"] for t in late_turns if t["ttft"] is not None]
    cached = [t["cached_prompt_tokens"] for t in late_turns]
    return {
        "mode": mode,
        "round": round_number,
        "seconds": time.monotonic() - started,
        "errors": errors,
        "late_turns_from": late_from,
        "late_ttft_p50": percentile(late, 50),
        # Share of the late turns' prompt tokens served from a prefix cache (None: not reported).
        "late_cached_share": None
        if None in cached or not late_turns
        else sum(cached) / sum(t["prompt_tokens"] for t in late_turns),
        "first_turn_ttft_p50": percentile([t["ttft"] for t in turns if t["turn"] == 1 and t["ttft"]], 50),
        "replicas_per_conversation": [len({t["replica"] for t in c.turns}) for c in conversations],
        "load_after": os.getloadavg()[0],
        "turns": turns,
    }


def warm_up(client: QwenClient) -> None:
    """Connect both of the client's channels to every replica first (ring_hash
    connects lazily, to the replicas its picks land on), so that no run pays
    for connection setup."""
    for index in range(12):
        client.chat([("user", "hi")], max_tokens=1, session_id=f"warm-up-{index}")
        client.chat([("user", "hi")], max_tokens=1)


def start_fleet(args: argparse.Namespace) -> list[ServerProcess]:
    flags = ["--threads", str(args.threads), "--log-level", "warning", *shlex.split(args.server_args)]
    replicas = []
    try:
        for index, host in enumerate(REPLICA_HOSTS):
            replicas.append(
                ServerProcess(args.model, "--no-http", "--replica-name", f"r{index + 1}", *flags, host=host)
            )
        for replica in replicas:
            replica.wait_serving(args.server_timeout)
    except BaseException:
        for replica in replicas:
            replica.close()
        raise
    return replicas


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=default_model_path(), help="model folder (default: the real model)")
    parser.add_argument("--server-args", default="", help="extra qwen-serve flags for every replica")
    parser.add_argument("--threads", type=int, default=1, help="engine threads per replica (default %(default)s)")
    # Not a multiple of the 3 replicas: conversations whose turns go out in
    # lockstep would otherwise each meet the same replica again and again under
    # plain round_robin, which is affinity by accident.
    parser.add_argument("--conversations", type=int, default=4, help="conversations at once (default %(default)s)")
    parser.add_argument("--turns", type=int, default=6, help="turns per conversation (default %(default)s)")
    parser.add_argument("--rounds", type=int, default=2, help="affinity/round_robin pairs (default %(default)s)")
    parser.add_argument("--max-tokens", type=int, default=24, help="answer length per turn (default %(default)s)")
    parser.add_argument(
        "--doc-lines", type=int, default=60, help="document lines in the first message (default %(default)s)"
    )
    parser.add_argument("--timeout", type=float, default=120.0, help="deadline per turn, seconds")
    parser.add_argument("--server-timeout", type=float, default=300.0)
    parser.add_argument(
        "--out", type=pathlib.Path, help="JSON report (default bench/results/fleet-affinity-<time>.json)"
    )
    args = parser.parse_args(argv)

    load_before = os.getloadavg()
    log(f"starting 3 replicas of {args.model} (load {load_before[0]:.2f})")
    replicas = start_fleet(args)
    target = "ipv4:" + ",".join(r.target for r in replicas)
    runs = []
    try:
        with QwenClient(target, timeout=args.timeout) as client:
            warm_up(client)
            for round_number in range(1, args.rounds + 1):
                order = MODES if round_number % 2 else MODES[::-1]
                for mode in order:
                    run = run_mode(client, mode, round_number, args)
                    log(
                        f"round {round_number} {mode:11s}: late-turn TTFT p50 {run['late_ttft_p50']:.3f} s, "
                        f"first turn {run['first_turn_ttft_p50']:.3f} s, replicas per conversation "
                        f"{run['replicas_per_conversation']}, {run['seconds']:.0f} s, load {run['load_after']:.2f}"
                        + (f", ERRORS {run['errors']}" if run["errors"] else "")
                    )
                    runs.append(run)
    finally:
        for replica in replicas:
            replica.close()

    ratios = []
    for round_number in range(1, args.rounds + 1):
        by_mode = {r["mode"]: r for r in runs if r["round"] == round_number}
        ratios.append(by_mode["affinity"]["late_ttft_p50"] / by_mode["round_robin"]["late_ttft_p50"])
    ratio = statistics.median(ratios)
    failed = [e for r in runs for e in r["errors"]]
    report = {
        "when": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "args": {k: str(v) for k, v in vars(args).items()},
        "load_before": load_before,
        "load_after": os.getloadavg(),
        "ratios_by_round": ratios,
        "ratio_median": ratio,
        "target": f"late-turn TTFT p50 affinity <= {TARGET_RATIO}x round_robin",
        "met": ratio <= TARGET_RATIO and not failed,
        "runs": runs,
    }
    out = args.out or RESULTS_DIR / f"fleet-affinity-{dt.datetime.now(dt.UTC):%Y%m%dT%H%M%SZ}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=1))

    print(
        f"\n| round | mode | late-turn TTFT p50 (turns >= {runs[0]['late_turns_from']}) | first-turn TTFT p50 "
        "| late-turn prompt tokens from cache | replicas per conversation | load |"
    )
    print("|---|---|---|---|---|---|---|")
    for run in runs:
        share = "n/a" if run["late_cached_share"] is None else f"{run['late_cached_share']:.0%}"
        print(
            f"| {run['round']} | {run['mode']} | {run['late_ttft_p50'] * 1000:.0f} ms | {run['first_turn_ttft_p50'] * 1000:.0f} ms "
            f"| {share} | {run['replicas_per_conversation']} | {run['load_after']:.2f} |"
        )
    print(
        f"\naffinity / round_robin, late-turn TTFT p50: median {ratio:.2f} (rounds: {', '.join(f'{r:.2f}' for r in ratios)}); "
        f"target <= {TARGET_RATIO}: {'met' if report['met'] else 'NOT met'}; load {load_before[0]:.2f} -> {os.getloadavg()[0]:.2f}"
    )
    if failed:
        print(f"{len(failed)} conversations failed: {failed}")
    print(f"report: {out}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
