"""Which kernel is fast on this CPU: `--quantization auto`.

Where the engine's own AVX2 kernels are built (service/engine/native, `make
setup`; x86-64), `auto` prefers int5: 5-bit weights, a scale per 32 inputs,
int8 activations per row. It reads 5.5 bits a weight against int8's 8, and
its products run on vpmaddubsw, 32 products an instruction: as fast as int8
at one stream here, ~1.3x at 16 streams, a prefill in ~0.75x the time (README
Performance), within the 3 % perplexity guard. Elsewhere it prefers int8:
torch._int_mm, fast where the CPU has int8 dot-product instructions (AVX512-VNNI, AMX, ARM's i8mm) and
10-30x slower where it does not (an AVX2-only AMD EPYC: bench/README.md).
`int8-weight-only` multiplies bf16 activations by int8 weights
(torch._weight_int8pack_mm): on CPUs with bf16 matrix units it can be the
fastest. So `auto` times one decode-sized product of the model's widest
Linear with the preferred kernel and with int8-weight-only, on the engine's
thread count, at start-up (milliseconds), and takes int8-weight-only only
when it is clearly faster."""

from __future__ import annotations

import functools
import logging
import time
from collections.abc import Callable

import torch

from . import native

_LOG = logging.getLogger(__name__)

AUTO = "auto"
# A decode step of a few streams through Qwen2.5-0.5B's fused gate/up projection.
PROBE_ROWS, PROBE_IN, PROBE_OUT = 4, 896, 9728
PROBE_REPEATS = 15
# int8-weight-only is taken only when it is clearly faster. Two replicas
# starting together on 2 cores timed the kernels at 6.30 and 6.32 ms (alone:
# 0.8 and 1.6): such a probe decides nothing, and the preferred kernel is
# then the better guess (exact integer products in blocks or rows). Where
# torch's int8 is the slow one (no native kernel, no int8 instructions) it
# is 10-30x slower, which no contention hides.
WEIGHT_ONLY_MARGIN = 1.25


def _fastest_seconds(runs: dict[str, Callable[[], object]], repeats: int = PROBE_REPEATS) -> dict[str, float]:
    """The fastest of `repeats` timings of each run, the runs taking turns.
    Taking turns makes a burst of load elsewhere (a replica starting beside
    this one) hit every candidate alike, and the fastest timing is the one
    least disturbed: a median of back-to-back timings once picked the slower
    kernel for a replica started beside another (int8 9.7 vs 8.0 ms here,
    when alone it is 0.8 vs 1.6 ms)."""
    for run in runs.values():
        run()  # first call: allocation, kernel selection
    fastest = dict.fromkeys(runs, float("inf"))
    for _ in range(repeats):
        for name, run in runs.items():
            start = time.perf_counter()
            run()
            fastest[name] = min(fastest[name], time.perf_counter() - start)
    return fastest


def probe_kernels() -> dict[str, float]:
    """Seconds of one probe product with the preferred kernel ("int5" where
    the native kernels run, else "int8") and with "int8-weight-only" (the
    fastest of PROBE_REPEATS each)."""
    generator = torch.Generator().manual_seed(0)
    weight = torch.randint(-127, 128, (PROBE_OUT, PROBE_IN), dtype=torch.int8, generator=generator)
    float_scale = torch.rand(PROBE_OUT, generator=generator, dtype=torch.float32)
    scale = float_scale.to(torch.bfloat16)
    activations = torch.randn(PROBE_ROWS, PROBE_IN, generator=generator, dtype=torch.float32)
    quantized = torch.randint(-127, 128, (PROBE_ROWS, PROBE_IN), dtype=torch.int8, generator=generator)
    weight_t = weight.t()
    with torch.inference_mode():
        preferred: tuple[str, Callable[[], object]]
        if native.available():
            nibbles, fifth, scales = native.int5_pack(torch.randn(PROBE_OUT, PROBE_IN, generator=generator))
            preferred = ("int5", functools.partial(native.int5_linear, activations, nibbles, fifth, scales, None))
        else:
            preferred = ("int8", functools.partial(torch._int_mm, quantized, weight_t))
        return _fastest_seconds(
            {
                preferred[0]: preferred[1],
                "int8-weight-only": lambda: torch._weight_int8pack_mm(activations.to(torch.bfloat16), weight, scale),
            }
        )


def resolve_quantization(quantization: str, threads: int, probe: Callable[[], dict[str, float]] | None = None) -> str:
    """`quantization` itself, or for `auto` the probe's preferred kernel (int5
    or int8), unless int8-weight-only is clearly faster here on `threads`
    threads (the engine's; it sets the same count). `probe` defaults to
    probe_kernels. Call it on the thread that will run the model (see
    Scheduler)."""
    if quantization != AUTO:
        return quantization
    torch.set_num_threads(threads)
    seconds = (probe or probe_kernels)()
    preferred = next(name for name in seconds if name != "int8-weight-only")
    weight_only_faster = seconds[preferred] > WEIGHT_ONLY_MARGIN * seconds["int8-weight-only"]
    chosen = "int8-weight-only" if weight_only_faster else preferred
    _LOG.info(
        "--quantization auto: %s (probe: %s)",
        chosen,
        ", ".join(f"{name} {1e3 * value:.2f} ms" for name, value in seconds.items()),
    )
    return chosen
