"""Engine-only decode speed and quality per --quantization (no server, no gRPC).

For each quantization: load the model, repack it, measure perplexity on the
quality guard's fixed texts (tests/real_model/quality_*.txt, first 512 tokens),
then time decode steps of B requests at position ~30 (B = 1, 4, 16, 32) and
prefill passes of 32 and 256 tokens. Aggregate tok/s = B / step time.
Quantizations are measured one after another in one process, on this thread
(as the engine does). A benchmark, not a test: run it on a quiet machine.

    python bench/engine_decode.py [--quantizations none,int8,int8-weight-only] [--threads 2]
    python bench/engine_decode.py --quantizations int8 --baseline /work/main --rounds 3   # A/B
    python bench/engine_decode.py --quantizations int8,int4 --alternate --rounds 5 --batches 1,16 \
        --repeats 5 --prefill-tokens "" --no-perplexity       # quantizations A/B in one process
    python bench/engine_decode.py --quantizations int5 --vnni --rounds 5 --no-perplexity   # int5's AVX2 vs VNNI kernels
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
from service.engine import native  # noqa: E402
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


def prepare(
    model: str, quantization: str, make_runner: RunnerFactory = _runner, perplexity: bool = True
) -> tuple[dict, object]:
    """Load and repack; perplexities (unless not wanted); every slot prefilled with a 30-token prompt."""
    loaded = load_model(model)
    started = time.perf_counter()
    runner = make_runner(loaded, quantization)
    result: dict = {"quantization": quantization, "repack_s": round(time.perf_counter() - started, 2)}
    result["packed_weights_mib"] = round(sum(t.nbytes for t in runner.packed_weights().values()) / 2**20, 1)
    with torch.inference_mode():
        for name, text in TEXTS.items():
            tokens = loaded.tokenizer.encode(text)[:512]
            result[f"perplexity_{name}"] = round(runner.perplexity(tokens), 3) if perplexity else "not measured"
        prompt = list(range(1000, 1030))
        runner.prefill(0, prompt, 0)
        for slot in range(1, max(BATCHES)):  # copies: a prefill per slot takes minutes with a slow int8 kernel
            runner.move_slot(0, slot, len(prompt))
    return result, runner


def time_steps(
    runner, result: dict, batches: tuple[int, ...] = BATCHES, repeats: int = 30, prefills: tuple[int, ...] = (32, 256)
) -> dict:
    with torch.inference_mode():
        for batch in batches:
            ms = _median_ms(functools.partial(runner.decode, [1234] * batch, [30] * batch), repeats)
            result[f"decode_ms_B{batch}"] = round(ms, 2)
            result[f"tok_s_B{batch}"] = round(batch / ms * 1e3, 1)
        for tokens in prefills:
            chunk = PrefillChunk(max(BATCHES), list(range(2000, 2000 + tokens)), 0)
            result[f"prefill_ms_{tokens}"] = round(_median_ms(functools.partial(runner.step, [], [], [chunk]), 5), 1)
    return result


def measure(model: str, quantization: str, perplexity: bool = True, **timing) -> dict:
    result, runner = prepare(model, quantization, perplexity=perplexity)
    return time_steps(runner, result, **timing)


def compare(
    model: str, quantization: str, baseline: pathlib.Path, rounds: int, perplexity: bool, **timing
) -> list[dict]:
    """This checkout against `baseline`, in one process, alternating every
    round (so a change in machine load hits both alike)."""
    sides = {
        f"{quantization} ({baseline})": prepare(model, quantization, _baseline_runner(baseline), perplexity),
        f"{quantization} (this checkout)": prepare(model, quantization, perplexity=perplexity),
    }
    results = []
    for round_ in range(rounds):
        for label, (prepared, runner) in sides.items():
            load = os.getloadavg()[0]
            results.append(
                time_steps(
                    runner, {**prepared, "quantization": f"{label} round {round_ + 1}, load {load:.1f}"}, **timing
                )
            )
    return results


def alternate(model: str, quantizations: list[str], rounds: int, perplexity: bool, **timing) -> list[dict]:
    """The quantizations' runners side by side in one process, timed in turn every
    round (first one first in odd rounds, last one first in even ones)."""
    sides = {q: prepare(model, q, perplexity=perplexity) for q in quantizations}
    results = []
    for round_ in range(rounds):
        for label in quantizations if round_ % 2 == 0 else quantizations[::-1]:
            prepared, runner = sides[label]
            load = os.getloadavg()[0]
            label = f"{label} round {round_ + 1}, load {load:.1f}"
            results.append(time_steps(runner, {**prepared, "quantization": label}, **timing))
    return results


def vnni_or_not(model: str, quantization: str, rounds: int, perplexity: bool, **timing) -> list[dict]:
    """One runner, its int5 products on the AVX2 kernels and on the AVX512-VNNI
    one in turn every round (ABBA): the same bits, so only the time differs."""
    if not native.use_vnni(True):
        raise SystemExit("this CPU has no AVX512-VNNI (or the native kernels are not built)")
    prepared, runner = prepare(model, quantization, perplexity=perplexity)
    results = []
    for round_ in range(rounds):
        for vnni in (False, True) if round_ % 2 == 0 else (True, False):
            native.use_vnni(vnni)
            load = os.getloadavg()[0]
            label = f"{quantization} {'AVX512-VNNI' if vnni else 'AVX2'} round {round_ + 1}, load {load:.1f}"
            results.append(time_steps(runner, {**prepared, "quantization": label}, **timing))
    native.use_vnni(True)
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
    parser.add_argument("--rounds", type=int, default=3, help="with --baseline or --alternate: alternations")
    parser.add_argument(
        "--alternate", action="store_true", help="the --quantizations side by side in one process, alternating"
    )
    parser.add_argument(
        "--vnni", action="store_true", help="each quantization on the AVX2 and the AVX512-VNNI kernels, alternating"
    )
    parser.add_argument("--batches", default=",".join(map(str, BATCHES)), help="decode batch sizes")
    parser.add_argument("--repeats", type=int, default=30, help="decode steps timed per batch size")
    parser.add_argument("--prefill-tokens", default="32,256", help="prefill pass sizes timed (empty: none)")
    parser.add_argument("--no-perplexity", action="store_true", help="skip the perplexity of the fixed texts")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    batches = tuple(int(b) for b in args.batches.split(","))
    prefills = tuple(int(t) for t in args.prefill_tokens.split(",") if t)
    timing = {"batches": batches, "repeats": args.repeats, "prefills": prefills}
    quantizations = args.quantizations.split(",")
    perplexity = not args.no_perplexity
    if args.baseline:
        results = [
            r for q in quantizations for r in compare(args.model, q, args.baseline, args.rounds, perplexity, **timing)
        ]
    elif args.vnni:
        results = [r for q in quantizations for r in vnni_or_not(args.model, q, args.rounds, perplexity, **timing)]
    elif args.alternate:
        results = alternate(args.model, quantizations, args.rounds, perplexity, **timing)
    else:
        results = [measure(args.model, q, perplexity, **timing) for q in quantizations]
    print(
        "| quantization | perplexity prose / code | "
        + " | ".join(f"B={b} tok/s" for b in batches)
        + " | prefill "
        + " / ".join(map(str, prefills))
        + " tokens ms | repack s | packed weights MiB |"
    )
    print("|---" * (len(batches) + 5) + "|")
    for r in results:
        print(
            f"| {r['quantization']} | {r['perplexity_text']} / {r['perplexity_code']} | "
            + " | ".join(str(r[f"tok_s_B{b}"]) for b in batches)
            + " | "
            + " / ".join(str(r[f"prefill_ms_{t}"]) for t in prefills)
            + f" | {r['repack_s']} | {r['packed_weights_mib']} |"
        )
    if args.out:
        args.out.write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
