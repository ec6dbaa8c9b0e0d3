"""Which int8 kernel is fast on this CPU: `--quantization auto`.

Both int8 paths hold the same int8 weights (one scale per output channel)
and both are batch-invariant; they differ in the product. `int8` quantizes
activations per row and multiplies in integers (torch._int_mm): fast where
the CPU has int8 dot-product instructions (AVX512-VNNI, AMX, ARM's i8mm) and
~10x slower than the other where it does not (measured on an AVX2-only AMD
EPYC: bench/int4_linear.py). `int8-weight-only` multiplies bf16 activations by
the int8 weights (torch._weight_int8pack_mm), and is also the more accurate
(it quantizes no activations). So `auto` times one decode-sized product of
the model's widest Linear with each kernel, on the engine's thread count, at
start-up (tens of milliseconds), and takes the faster. It is the default:
on an AVX2-only host it is the difference between ~2 and ~20 tokens/s at 16
streams (README Performance)."""

from __future__ import annotations

import logging
import statistics
import time
from collections.abc import Callable

import torch

_LOG = logging.getLogger(__name__)

AUTO = "auto"
# A decode step of a few streams through Qwen2.5-0.5B's fused gate/up projection.
PROBE_ROWS, PROBE_IN, PROBE_OUT = 4, 896, 9728
PROBE_REPEATS = 7


def _median_seconds(run: Callable[[], object], repeats: int = PROBE_REPEATS) -> float:
    run()  # first call: allocation, kernel selection
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        run()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def probe_int8_kernels() -> dict[str, float]:
    """Median seconds of one probe product with each int8 kernel."""
    generator = torch.Generator().manual_seed(0)
    weight = torch.randint(-127, 128, (PROBE_OUT, PROBE_IN), dtype=torch.int8, generator=generator)
    scale = torch.rand(PROBE_OUT, generator=generator, dtype=torch.float32).to(torch.bfloat16)
    activations = torch.randn(PROBE_ROWS, PROBE_IN, generator=generator, dtype=torch.float32)
    quantized = torch.randint(-127, 128, (PROBE_ROWS, PROBE_IN), dtype=torch.int8, generator=generator)
    weight_t = weight.t()
    with torch.inference_mode():
        return {
            "int8": _median_seconds(lambda: torch._int_mm(quantized, weight_t)),
            "int8-weight-only": _median_seconds(
                lambda: torch._weight_int8pack_mm(activations.to(torch.bfloat16), weight, scale)
            ),
        }


def resolve_quantization(
    quantization: str, threads: int, probe: Callable[[], dict[str, float]] = probe_int8_kernels
) -> str:
    """`quantization` itself, or for `auto` the int8 kernel that is faster
    here on `threads` threads (the engine's; it sets the same count)."""
    if quantization != AUTO:
        return quantization
    torch.set_num_threads(threads)
    seconds = probe()
    chosen = min(seconds, key=seconds.__getitem__)
    _LOG.info(
        "--quantization auto: %s (probe: %s)",
        chosen,
        ", ".join(f"{name} {1e3 * value:.2f} ms" for name, value in seconds.items()),
    )
    return chosen
