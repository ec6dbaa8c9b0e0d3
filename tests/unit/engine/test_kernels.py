"""--quantization auto: the faster int8 kernel of a start-up probe."""

from __future__ import annotations

import pytest

from service.engine.kernels import probe_int8_kernels, resolve_quantization


@pytest.mark.parametrize(
    "timings,chosen",
    [
        ({"int8": 0.001, "int8-weight-only": 0.004}, "int8"),
        ({"int8": 0.009, "int8-weight-only": 0.002}, "int8-weight-only"),
    ],
)
def test_auto_takes_the_faster_kernel(timings, chosen):
    assert resolve_quantization("auto", 1, probe=lambda: timings) == chosen


@pytest.mark.parametrize("quantization", ["int8", "int8-weight-only", "int4", "none"])
def test_an_explicit_quantization_is_kept_without_probing(quantization):
    def probe() -> dict[str, float]:
        raise AssertionError("probed for an explicit quantization")

    assert resolve_quantization(quantization, 1, probe=probe) == quantization


def test_the_real_probe_times_both_kernels():
    seconds = probe_int8_kernels()
    assert set(seconds) == {"int8", "int8-weight-only"}
    assert all(0 < value < 5 for value in seconds.values()), seconds
    assert resolve_quantization("auto", 1) in seconds
