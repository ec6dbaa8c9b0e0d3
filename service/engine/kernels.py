"""Which int8 kernel is fast on this CPU: `--quantization auto`.

Both int8 paths hold the same int8 weights (one scale per output channel)
and both are batch-invariant; they differ in the product. `int8` quantizes
activations per row and multiplies in integers: on x86-64 with AVX2 with the
engine's own kernel (service/engine/native, built by `make setup`), else
with torch._int_mm, which is fast where the CPU has int8 dot-product
instructions (AVX512-VNNI, AMX, ARM's i8mm) and 10-30x slower where it does
not (an AVX2-only AMD EPYC: bench/README.md). `int8-weight-only` multiplies
bf16 activations by the int8 weights (torch._weight_int8pack_mm), and is the
more accurate (it quantizes no activations). So `auto` times one
decode-sized product of the model's widest Linear with each kernel, on the
engine's thread count, at start-up (milliseconds), and takes
int8-weight-only only when it is clearly faster. It is the default: which
one wins depends on the CPU and on whether the native kernel is built
(README Performance)."""

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
# 0.8 and 1.6): such a probe decides nothing, and int8 is then the better
# guess (exact integer products, the golden transcript's kernel). Where
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


def probe_int8_kernels() -> dict[str, float]:
    """Seconds of one probe product with each int8 kernel (the fastest of PROBE_REPEATS)."""
    generator = torch.Generator().manual_seed(0)
    weight = torch.randint(-127, 128, (PROBE_OUT, PROBE_IN), dtype=torch.int8, generator=generator)
    float_scale = torch.rand(PROBE_OUT, generator=generator, dtype=torch.float32)
    scale = float_scale.to(torch.bfloat16)
    activations = torch.randn(PROBE_ROWS, PROBE_IN, generator=generator, dtype=torch.float32)
    quantized = torch.randint(-127, 128, (PROBE_ROWS, PROBE_IN), dtype=torch.int8, generator=generator)
    weight_t = weight.t()
    with torch.inference_mode():
        if native.available():
            int8_product = functools.partial(native.int8_linear, activations, weight, float_scale, None)
        else:
            int8_product = functools.partial(torch._int_mm, quantized, weight_t)
        return _fastest_seconds(
            {
                "int8": int8_product,
                "int8-weight-only": lambda: torch._weight_int8pack_mm(activations.to(torch.bfloat16), weight, scale),
            }
        )


def resolve_quantization(quantization: str, threads: int, probe: Callable[[], dict[str, float]] | None = None) -> str:
    """`quantization` itself, or for `auto` int8, unless int8-weight-only is
    clearly faster here on `threads` threads (the engine's; it sets the same
    count). `probe` defaults to probe_int8_kernels. Call it on the thread
    that will run the model (see Scheduler)."""
    if quantization != AUTO:
        return quantization
    torch.set_num_threads(threads)
    seconds = (probe or probe_int8_kernels)()
    chosen = "int8-weight-only" if seconds["int8"] > WEIGHT_ONLY_MARGIN * seconds["int8-weight-only"] else "int8"
    _LOG.info(
        "--quantization auto: %s (probe: %s)",
        chosen,
        ", ".join(f"{name} {1e3 * value:.2f} ms" for name, value in seconds.items()),
    )
    return chosen
