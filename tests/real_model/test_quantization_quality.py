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
# Measured on this text: bf16 13.25, int8 13.37 (+0.9 %), int8-weight-only
# 13.27 (+0.1 %); all-dynamic int8 including down_proj was 21.2 (+60 %).
# The bounds leave room for kernel differences between CPUs.
MAX_PERPLEXITY_RATIO = {"int8": 1.03, "int8-weight-only": 1.02}


def perplexity(model_dir: pathlib.Path, quantization: str) -> float:
    loaded = load_model(str(model_dir))
    ids = loaded.tokenizer.encode(TEXT)[:MAX_TOKENS]
    runner = ModelRunner(loaded, num_slots=1, max_model_len=MAX_TOKENS, quantization=quantization)
    logits = runner.prefill(0, ids, 0, all_logits=True)
    return math.exp(torch.nn.functional.cross_entropy(logits[:-1], torch.tensor(ids[1:])).item())


def test_int8_keeps_bf16_perplexity(real_model_dir):
    reference = perplexity(real_model_dir, "none")
    assert reference < 40, "the fixed text should be ordinary for the model"
    for quantization, bound in MAX_PERPLEXITY_RATIO.items():
        quantized = perplexity(real_model_dir, quantization)
        print(f"perplexity bf16 {reference:.2f}, {quantization} {quantized:.2f} ({quantized / reference - 1:+.1%})")
        assert quantized <= reference * bound, quantization
