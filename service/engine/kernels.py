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
engine's thread count, at start-up (milliseconds), and takes the faster. It
is the default: which one wins depends on the CPU and on whether the native
kernel is built (README Performance)."""

from __future__ import annotations

import functools
import logging
import statistics
import time
from collections.abc import Callable

import torch

from . import native

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
        return {
            "int8": _median_seconds(int8_product),
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
