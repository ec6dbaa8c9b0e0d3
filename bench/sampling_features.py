"""What logprobs, penalties and logit_bias add to one step's token selection
(no model: random logits of the real vocabulary's width).

For B rows (--batches, default 1, 4, 16): select_tokens for sampled rows
without any feature (A) against the same rows with top_logprobs=20,
presence/frequency penalties over --output-tokens generated tokens and a
300-entry logit_bias, plus token_logprobs (B). A and B alternate for --rounds rounds of --repeats steps each; the
median per round and over rounds are reported, as milliseconds of this
process's CPU time per step (CPU time, not wall time: on a shared, loaded
machine wall time mostly measures the other processes). A benchmark, not a
test: note the machine's load (printed).

    python bench/sampling_features.py [--rounds 5] [--repeats 30] [--threads 2]
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import statistics
import sys
import time
from collections.abc import Callable

import torch

REPO = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from service.engine.sampling import make_generator, select_tokens, token_logprobs  # noqa: E402
from service.engine.types import MAX_LOGIT_BIAS_ENTRIES, SamplingParams  # noqa: E402

VOCAB = 151936  # Qwen2.5's logits width
PLAIN = SamplingParams(max_tokens=1, temperature=0.7, top_p=0.8, top_k=20, seed=1)
FEATURES = SamplingParams(
    max_tokens=1,
    temperature=0.7,
    top_p=0.8,
    top_k=20,
    seed=1,
    logprobs=True,
    top_logprobs=20,
    presence_penalty=0.5,
    frequency_penalty=0.5,
    logit_bias=tuple((token, 1.0) for token in range(MAX_LOGIT_BIAS_ENTRIES)),
)


def step(logits: torch.Tensor, params: SamplingParams, rows: int, outputs: list[list[int]]) -> None:
    batch = logits.clone()
    all_params = [params] * rows
    chosen = select_tokens(batch, all_params, [make_generator(1) for _ in range(rows)], [None] * rows, None, outputs)
    if params.logprobs:
        token_logprobs(batch, all_params, chosen)


def _median_cpu_ms(run: Callable[[], None], repeats: int) -> float:
    run()
    times = []
    for _ in range(repeats):
        start = time.process_time()
        run()
        times.append(time.process_time() - start)
    return statistics.median(times) * 1e3


def measure(rows: int, rounds: int, repeats: int, output_tokens: int) -> dict:
    logits = torch.randn(rows, VOCAB) * 5
    # Each row has generated output_tokens tokens so far (the penalties' input).
    outputs = [torch.randint(0, VOCAB, (output_tokens,)).tolist() for _ in range(rows)]
    plain, features = [], []
    for _ in range(rounds):  # alternate A and B so load drifts hit both alike
        plain.append(_median_cpu_ms(lambda: step(logits, PLAIN, rows, outputs), repeats))
        features.append(_median_cpu_ms(lambda: step(logits, FEATURES, rows, outputs), repeats))
    return {
        "rows": rows,
        "plain_ms": round(statistics.median(plain), 3),
        "features_ms": round(statistics.median(features), 3),
        "plain_ms_rounds": [round(v, 3) for v in plain],
        "features_ms_rounds": [round(v, 3) for v in features],
    }


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--batches", default="1,4,16")
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--repeats", type=int, default=30)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--output-tokens", type=int, default=256)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    with torch.inference_mode():
        results = [
            measure(int(rows), args.rounds, args.repeats, args.output_tokens) for rows in args.batches.split(",")
        ]
    print(json.dumps({"load_average": os.getloadavg(), "threads": args.threads, "results": results}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
