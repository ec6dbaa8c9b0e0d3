"""Exact greedy answers of the real model with the server's defaults (int8):
a change to the numbers (quantization, kernels, attention, sampling, the
chat template) shows here as a changed text, where the substring checks of
the other real-model tests may still pass.

The answers live in golden_int8.json next to this file. Regenerate them only
on purpose, after deciding that a change is meant to alter the numbers:

    QWEN_WRITE_GOLDEN=1 .venv/bin/pytest tests/real_model/test_golden_transcript.py

and review the diff of golden_int8.json in the same commit.
"""

from __future__ import annotations

import json
import os
import pathlib

import pytest

from service.chat import ChatMessage, ChatParams, ChatService
from service.config import Settings
from service.engine.config import EngineConfig
from service.engine.engine import Engine
from service.engine.loader import load_model

pytestmark = pytest.mark.real_model

GOLDEN = pathlib.Path(__file__).with_name("golden_int8.json")
PROMPTS = [
    "What is the capital of France?",
    "Write a Python function that returns the square of a number.",
    "法国的首都是哪里？",
    "List three prime numbers.",
]
MAX_TOKENS = 32
# The server's defaults but for the threads and the quantization: fixed, so
# the transcript does not depend on the machine's core count or on the kernel
# `--quantization auto` would pick on it.
THREADS = 2


async def _transcript(model_dir: pathlib.Path) -> dict:
    settings = Settings(model=str(model_dir), threads=THREADS, quantization="int8")
    engine = Engine(
        lambda quantization: load_model(settings.model, settings.dtype, quantization, settings.weight_cache_dir),
        EngineConfig.from_settings(settings),
    )
    engine.start()
    try:
        chat = ChatService(engine, settings)
        answers = []
        for prompt in PROMPTS:
            # A client that asks for greedy decoding and leaves the rest to the server.
            params = ChatParams(messages=(ChatMessage("user", prompt),), temperature=0.0, max_tokens=MAX_TOKENS)
            events = [event async for event in chat.generate(chat.prepare(params))]
            answers.append({"prompt": prompt, "answer": "".join(event.text for event in events)})
    finally:
        await engine.shutdown()
    return {
        "quantization": settings.quantization,
        "dtype": settings.dtype,
        "kv_cache_dtype": settings.kv_cache_dtype,
        "threads": THREADS,
        "max_tokens": MAX_TOKENS,
        "answers": answers,
    }


@pytest.mark.timeout(1200)  # loading the real model takes minutes on a busy machine
async def test_greedy_answers_match_the_golden_transcript(real_model_dir):
    got = await _transcript(real_model_dir)
    if os.environ.get("QWEN_WRITE_GOLDEN"):
        GOLDEN.write_text(json.dumps(got, ensure_ascii=False, indent=1) + "\n")
        pytest.skip(f"wrote {GOLDEN.name}: review its diff and commit it")
    expected = json.loads(GOLDEN.read_text())
    assert {k: v for k, v in got.items() if k != "answers"} == {k: v for k, v in expected.items() if k != "answers"}
    for mine, golden in zip(got["answers"], expected["answers"], strict=True):
        assert mine == golden, f"the answer to {golden['prompt']!r} changed"
