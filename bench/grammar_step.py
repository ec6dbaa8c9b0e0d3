"""What constrained decoding adds to an engine step: 16 decoding rows of the
real model (the default int8 quantization), of which 0, 1 or 16 carry a JSON
Schema grammar, each step = forward pass + select_tokens (masks for the
constrained rows, sampling at temperature 0.7, feeding the grammars).

Configurations alternate within each round (0, 1, 16, 0, 1, 16, ...) because
the machine is shared; each round takes the median step (robust to a step
preempted by another process), the table the median over rounds with the
spread, and the part spent in select_tokens. Grammars restart every
`--cycle` steps so they stay mid-document (the expensive states).

    python bench/grammar_step.py [--rounds 5] [--steps 60] [--threads 2]
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import statistics
import sys
import time

import torch

REPO = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from bench.grammar_libs import SCHEMA  # noqa: E402
from service.config import default_model_path  # noqa: E402
from service.engine.config import EngineConfig  # noqa: E402
from service.engine.grammar import GrammarCompiler  # noqa: E402
from service.engine.loader import load_model  # noqa: E402
from service.engine.model_runner import ModelRunner  # noqa: E402
from service.engine.sampling import make_generator, select_tokens  # noqa: E402
from service.engine.types import ConstraintKind, OutputConstraint, SamplingParams  # noqa: E402

BATCH = 16
CONSTRAINED = (0, 1, 16)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=str(default_model_path()))
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--steps", type=int, default=60, help="steps per configuration per round")
    parser.add_argument("--cycle", type=int, default=30, help="steps before the grammars restart")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()

    torch.set_num_threads(args.threads)
    loaded = load_model(args.model)
    compiler = GrammarCompiler(loaded.tokenizer, loaded.model.config.vocab_size, loaded.eos_token_ids)
    grammar = compiler.compile(OutputConstraint(ConstraintKind.JSON_SCHEMA, json.dumps(SCHEMA)))
    runner = ModelRunner(
        loaded, EngineConfig.defaults(max_batch_size=BATCH + 1, max_model_len=1024, quantization="int8")
    )
    params = [SamplingParams(max_tokens=1000, temperature=0.7, top_p=0.9, top_k=20)] * BATCH
    generators = [make_generator(row) for row in range(BATCH)]
    step_ms: dict[int, list[float]] = {k: [] for k in CONSTRAINED}
    select_ms: dict[int, list[float]] = {k: [] for k in CONSTRAINED}
    loads = []
    with torch.inference_mode():
        prompt = list(range(1000, 1030))
        for slot in range(BATCH):
            runner.prefill(slot, prompt, 0)
        for _ in range(args.rounds):
            loads.append(os.getloadavg()[0])
            for constrained in CONSTRAINED:
                steps, selects = [], []
                for step in range(args.steps):
                    if step % args.cycle == 0:
                        grammars = [grammar.matcher() if row < constrained else None for row in range(BATCH)]
                    start = time.perf_counter()
                    logits = runner.decode([1234] * BATCH, [30] * BATCH)
                    selected = time.perf_counter()
                    chosen = select_tokens(logits, params, generators, [None] * BATCH, grammars)
                    end = time.perf_counter()
                    failed = [c for c in chosen if isinstance(c, Exception)]
                    if failed:
                        raise failed[0]
                    steps.append(end - start)
                    selects.append(end - selected)
                step_ms[constrained].append(statistics.median(steps) * 1e3)
                select_ms[constrained].append(statistics.median(selects) * 1e3)
    print(
        f"rounds: {args.rounds} x {args.steps} steps; load average (1 min) per round: {', '.join(f'{load:.1f}' for load in loads)}"
    )
    print(
        "| constrained rows of 16 | step ms | of which select_tokens ms | step overhead vs 0 (median of per-round ratios) |"
    )
    print("|---|---|---|---|")
    for constrained in CONSTRAINED:
        ratios = [a / b - 1 for a, b in zip(step_ms[constrained], step_ms[0])]

        def cell(values: list[float], fmt: str = ".2f") -> str:
            return f"{statistics.median(values):{fmt}} ({min(values):{fmt}}-{max(values):{fmt}})"

        print(
            f"| {constrained} | {cell(step_ms[constrained])} | {cell(select_ms[constrained])} | "
            f"{statistics.median(ratios) * 100:+.1f} % ({min(ratios) * 100:+.1f}..{max(ratios) * 100:+.1f}) |"
        )


if __name__ == "__main__":
    main()
