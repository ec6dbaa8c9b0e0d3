"""Quality guard for --quantization: perplexity of a fixed text under the
quantized model versus bf16 (measured figures are in the README)."""

from __future__ import annotations

import math
import pathlib

import pytest
import torch

from service.engine.loader import load_model
from service.engine.model_runner import ModelRunner

pytestmark = pytest.mark.real_model

# A fixed mix of English prose, code and Chinese, in the model's chat format.
TEXT = (pathlib.Path(__file__).parent / "quality_text.txt").read_text()
MAX_TOKENS = 512
# Weight-only int8 measured at +0.0 % (24.31 vs 24.31 on this text);
# the bound leaves room for kernel differences between CPUs.
MAX_INT8_PERPLEXITY_RATIO = 1.02


def perplexity(model_dir: pathlib.Path, quantization: str) -> float:
    loaded = load_model(str(model_dir))
    ids = loaded.tokenizer.encode(TEXT)[:MAX_TOKENS]
    runner = ModelRunner(loaded, num_slots=1, max_model_len=MAX_TOKENS, quantization=quantization)
    logits = runner.prefill(0, ids, 0, all_logits=True)
    return math.exp(torch.nn.functional.cross_entropy(logits[:-1], torch.tensor(ids[1:])).item())


def test_int8_weight_only_keeps_bf16_perplexity(real_model_dir):
    reference = perplexity(real_model_dir, "none")
    quantized = perplexity(real_model_dir, "int8")
    print(f"perplexity bf16 {reference:.2f}, int8 {quantized:.2f} ({quantized / reference - 1:+.1%})")
    assert reference < 40, "the fixed text should be ordinary for the model"
    assert quantized <= reference * MAX_INT8_PERPLEXITY_RATIO
