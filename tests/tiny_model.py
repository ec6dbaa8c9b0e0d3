"""Build a tiny random Qwen2 model and a byte-level BPE tokenizer with the
ChatML template, so fast tests never need real weights or a hub."""

from __future__ import annotations

import pathlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from service.engine.config import EngineConfig

CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)

_CORPUS = [
    "The quick brown fox jumps over the lazy dog.",
    "What is the capital of France? Paris is the capital of France.",
    "def add(a, b):\n    return a + b\n",
    "法国的首都是哪里？巴黎是法国的首都。",
    "Hello, world! Stream tokens over gRPC to the edge.",
] * 20


def tiny_engine_config(**overrides: Any) -> EngineConfig:
    """An engine for the tiny model: four slots, 16-token prompt chunks (also
    while streams decode), one thread, no quantization, no prefix cache, no
    speculation;
    `overrides` replace any of these or of the server's defaults."""
    from service.engine.config import EngineConfig

    options: dict[str, Any] = dict(
        max_batch_size=4,
        max_waiting=8,
        max_model_len=512,
        prefill_chunk_size=16,
        threads=1,
        quantization="none",
        prefix_cache_bytes=0,
        speculative_tokens=0,
    )
    options.update(overrides)
    options.setdefault("interleaved_prefill_tokens", options["prefill_chunk_size"])
    return EngineConfig.defaults(**options)


def build_tiny_model(folder: pathlib.Path, seed: int = 0) -> pathlib.Path:
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast, Qwen2Config, Qwen2ForCausalLM

    folder.mkdir(parents=True, exist_ok=True)
    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=400, special_tokens=specials, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    tok.train_from_iterator(_CORPUS, trainer)
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        additional_special_tokens=["<|im_start|>"],
    )
    tokenizer.chat_template = CHATML_TEMPLATE
    tokenizer.save_pretrained(folder)

    torch.manual_seed(seed)
    config = Qwen2Config(
        vocab_size=len(tokenizer),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=2048,
        tie_word_embeddings=False,
        initializer_range=0.3,
        eos_token_id=tokenizer.convert_tokens_to_ids("<|im_end|>"),
        bos_token_id=None,
    )
    model = Qwen2ForCausalLM(config)
    # A wide init (initializer_range) gives peaked, varied logits: greedy output
    # changes from token to token, so equality checks against reference
    # decoding mean something.
    with torch.no_grad():
        model.lm_head.weight[config.eos_token_id] = 0  # rarely end early
    model.save_pretrained(folder)
    return folder
