from __future__ import annotations

import pytest
from transformers import AutoTokenizer

from service.engine.detokenizer import IncrementalDetokenizer


@pytest.fixture(scope="module")
def tokenizer(tiny_model_dir):
    return AutoTokenizer.from_pretrained(tiny_model_dir)


def _stream(tokenizer, text: str, stop=()):
    detok = IncrementalDetokenizer(tokenizer, tuple(stop))
    pieces = []
    for token in tokenizer.encode(text, add_special_tokens=False):
        pieces.append(detok.add_token(token))
        if detok.stopped:
            break
    if not detok.stopped:
        pieces.append(detok.flush())
    return pieces, detok.stopped


@pytest.mark.parametrize(
    "text", ["Hello, world! Stream tokens.", "法国的首都是巴黎。", "emoji 🚀 and ünïcödé", "a\n  b\tc"]
)
def test_incremental_text_equals_full_decode(tokenizer, text):
    pieces, stopped = _stream(tokenizer, text)
    assert "".join(pieces) == text
    assert not stopped
    assert all("\ufffd" not in p for p in pieces), "no half characters are released"


def test_multibyte_characters_are_never_split(tokenizer):
    # Byte-level BPE splits rare CJK characters over several tokens.
    text = "龘靐齉"
    ids = tokenizer.encode(text, add_special_tokens=False)
    assert len(ids) > len(text), "the test needs characters spread over several tokens"
    pieces, _ = _stream(tokenizer, text)
    assert "".join(pieces) == text


def test_stop_string_ends_output_before_it(tokenizer):
    pieces, stopped = _stream(tokenizer, "The answer is Paris. Next question", stop=[". Next"])
    assert stopped
    assert "".join(pieces) == "The answer is Paris"


def test_text_that_only_starts_a_stop_string_is_released(tokenizer):
    pieces, stopped = _stream(tokenizer, "Paris. No more", stop=[". Next"])
    assert not stopped
    assert "".join(pieces) == "Paris. No more"


def test_earliest_of_several_stop_strings_wins(tokenizer):
    pieces, stopped = _stream(tokenizer, "one two three four", stop=["four", "two"])
    assert stopped
    assert "".join(pieces) == "one "
