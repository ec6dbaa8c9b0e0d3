"""Quality guard for --quantization: perplexity of a fixed text under the
quantized model versus bf16 (measured figures: README "Performance", bench/README.md)."""

from __future__ import annotations

import pathlib

import pytest

from service.engine.config import EngineConfig
from service.engine.loader import load_model
from service.engine.model_runner import ModelRunner

pytestmark = pytest.mark.real_model

# Fixed texts: a mix of English prose, code and Chinese in the model's chat
# format, and a plain Python module (a snapshot; it must not change).
TEXTS = {name: (pathlib.Path(__file__).parent / f"quality_{name}.txt").read_text() for name in ("text", "code")}
MAX_TOKENS = 512
# Measured (bf16 13.24 / 6.13): int8 +1.6 % / +0.9 %, int8-weight-only
# +0.0 % / +0.4 %. torch.ao's 7-bit activations cost +0.9 % / +7.8 %, and
# dynamic int8 in down_proj too +10 % / +11 %. The bounds leave room for
# kernel differences between CPUs. int4 (4-bit groups of 32) measured 14.05 / 14.47 against bf16's
# 13.27 / 13.31 (+5.9 % / +8.7 %): outside the 3 % asked of a default, so it is an option, bounded here
# so that it does not get worse.
# int5 (5-bit blocks of 32, the `auto` default where the AVX2 kernels run) measured 13.64 / 13.36 against
# 13.27 / 13.31 (+2.8 % / +0.3 %), and 13.68 (+3.1 %) on the prose once the native decoder layers changed
# the float rounding; with the attention projections in int8 13.38 / 13.38 (+0.9 % / +0.5 %).
MAX_PERPLEXITY_RATIO = {"int8": 1.03, "int5": 1.03, "int8-weight-only": 1.02, "int4": 1.10}


def perplexities(model_dir: pathlib.Path, quantization: str) -> dict[str, float]:
    loaded = load_model(str(model_dir))
    runner = ModelRunner(
        loaded, EngineConfig.defaults(max_batch_size=1, max_model_len=MAX_TOKENS, quantization=quantization)
    )
    return {name: runner.perplexity(loaded.tokenizer.encode(text)[:MAX_TOKENS]) for name, text in TEXTS.items()}


@pytest.fixture(scope="module")
def reference(real_model_dir) -> dict[str, float]:
    values = perplexities(real_model_dir, "none")
    assert all(value < 40 for value in values.values()), f"the fixed texts should be ordinary: {values}"
    return values


# One test per quantization, each with its own time limit: int4's product is
# slow on some CPUs (minutes for these 1,024 tokens on an AVX2-only host).
@pytest.mark.timeout(900)
@pytest.mark.parametrize("quantization", MAX_PERPLEXITY_RATIO)
def test_quantization_keeps_bf16_perplexity(real_model_dir, reference, quantization):
    bound = MAX_PERPLEXITY_RATIO[quantization]
    for name, value in perplexities(real_model_dir, quantization).items():
        print(
            f"{name}: perplexity bf16 {reference[name]:.2f}, {quantization} {value:.2f} ({value / reference[name] - 1:+.1%})"
        )
        assert value <= reference[name] * bound, (quantization, name)
