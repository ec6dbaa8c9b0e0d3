"""Engine-only decode speed and quality per --quantization (no server, no gRPC).

For each quantization: load the model, repack it, measure perplexity on the
quality guard's fixed texts (tests/real_model/quality_*.txt, first 512 tokens),
then time decode steps of B requests at position ~30 (B = 1, 4, 16, 32) and
prefill passes of 32 and 256 tokens. Aggregate tok/s = B / step time.
Quantizations are measured one after another in one process, on this thread
(as the engine does). A benchmark, not a test: run it on a quiet machine.

    python bench/engine_decode.py [--quantizations none,int8,int8-weight-only] [--threads 2]
    python bench/engine_decode.py --quantizations int8 --baseline /work/main --rounds 3   # A/B
"""

from __future__ import annotations

import argparse
import functools
import importlib
import json
import os
import pathlib
import sys
import time
import types
from collections.abc import Callable

import torch

REPO = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from service.config import default_model_path  # noqa: E402
from service.engine.config import EngineConfig  # noqa: E402
from service.engine.loader import LoadedModel, load_model  # noqa: E402
from service.engine.model_runner import ModelRunner, PrefillChunk  # noqa: E402

TEXTS = {name: (REPO / "tests" / "real_model" / f"quality_{name}.txt").read_text() for name in ("text", "code")}
BATCHES = (1, 4, 16, 32)


def _median_ms(run, repeats: int) -> float:
    run()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        run()
        times.append(time.perf_counter() - start)
    return sorted(times)[len(times) // 2] * 1e3


RunnerFactory = Callable[[LoadedModel, str], object]


def _runner(loaded: LoadedModel, quantization: str) -> ModelRunner:
    return ModelRunner(
        loaded, EngineConfig.defaults(max_batch_size=max(BATCHES) + 1, max_model_len=1024, quantization=quantization)
    )


def _baseline_runner(checkout: pathlib.Path) -> RunnerFactory:
    """Another checkout's ModelRunner, imported under its own package name;
    one from before EngineConfig takes its settings as keywords."""
    for name, folder in (("qwen_baseline", "service"), ("qwen_baseline.engine", "service/engine")):
        package = types.ModuleType(name)
        package.__path__ = [str(checkout / folder)]
        sys.modules[name] = package
    runner_class = importlib.import_module("qwen_baseline.engine.model_runner").ModelRunner
    if not (checkout / "service" / "engine" / "config.py").is_file():
        return lambda loaded, quantization: runner_class(
            loaded, num_slots=max(BATCHES) + 1, max_model_len=1024, quantization=quantization
        )
    config = importlib.import_module("qwen_baseline.engine.config").EngineConfig
    return lambda loaded, quantization: runner_class(
        loaded, config.defaults(max_batch_size=max(BATCHES) + 1, max_model_len=1024, quantization=quantization)
    )


def prepare(model: str, quantization: str, make_runner: RunnerFactory = _runner) -> tuple[dict, object]:
    """Load and repack; perplexities; every slot prefilled with a 30-token prompt."""
    loaded = load_model(model)
    started = time.perf_counter()
    runner = make_runner(loaded, quantization)
    result: dict = {"quantization": quantization, "repack_s": round(time.perf_counter() - started, 2)}
    with torch.inference_mode():
        for name, text in TEXTS.items():
            result[f"perplexity_{name}"] = round(runner.perplexity(loaded.tokenizer.encode(text)[:512]), 3)
        prompt = list(range(1000, 1030))
        for slot in range(max(BATCHES)):
            runner.prefill(slot, prompt, 0)
    return result, runner


def time_steps(runner, result: dict) -> dict:
    with torch.inference_mode():
        for batch in BATCHES:
            ms = _median_ms(functools.partial(runner.decode, [1234] * batch, [30] * batch), 30)
            result[f"decode_ms_B{batch}"] = round(ms, 2)
            result[f"tok_s_B{batch}"] = round(batch / ms * 1e3, 1)
        for tokens in (32, 256):
            chunk = PrefillChunk(max(BATCHES), list(range(2000, 2000 + tokens)), 0)
            result[f"prefill_ms_{tokens}"] = round(_median_ms(functools.partial(runner.step, [], [], [chunk]), 5), 1)
    return result


def measure(model: str, quantization: str) -> dict:
    result, runner = prepare(model, quantization)
    return time_steps(runner, result)


def compare(model: str, quantization: str, baseline: pathlib.Path, rounds: int) -> list[dict]:
    """This checkout against `baseline`, in one process, alternating every
    round (so a change in machine load hits both alike)."""
    sides = {
        f"{quantization} ({baseline})": prepare(model, quantization, _baseline_runner(baseline)),
        f"{quantization} (this checkout)": prepare(model, quantization),
    }
    results = []
    for round_ in range(rounds):
        for label, (prepared, runner) in sides.items():
            load = os.getloadavg()[0]
            results.append(
                time_steps(runner, {**prepared, "quantization": f"{label} round {round_ + 1}, load {load:.1f}"})
            )
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=str(default_model_path()))
    parser.add_argument("--quantizations", default="none,int8,int8-weight-only")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", type=pathlib.Path, help="write the results as JSON here too")
    parser.add_argument(
        "--baseline",
        type=pathlib.Path,
        help="another checkout (e.g. /work/main): its ModelRunner and this one's, alternating",
    )
    parser.add_argument("--rounds", type=int, default=3, help="with --baseline: alternations")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    if args.baseline:
        results = [r for q in args.quantizations.split(",") for r in compare(args.model, q, args.baseline, args.rounds)]
    else:
        results = [measure(args.model, q) for q in args.quantizations.split(",")]
    print(
        "| quantization | perplexity prose / code | "
        + " | ".join(f"B={b} tok/s" for b in BATCHES)
        + " | prefill 32 / 256 tokens ms | repack s |"
    )
    print("|---" * (len(BATCHES) + 4) + "|")
    for r in results:
        print(
            f"| {r['quantization']} | {r['perplexity_text']} / {r['perplexity_code']} | "
            + " | ".join(str(r[f"tok_s_B{b}"]) for b in BATCHES)
            + f" | {r['prefill_ms_32']} / {r['prefill_ms_256']} | {r['repack_s']} |"
        )
    if args.out:
        args.out.write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
