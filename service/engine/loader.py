"""Load a Qwen2-family causal LM and its tokenizer from a local Hugging Face
folder, a .gguf file, or a hub id, in the requested dtype."""

from __future__ import annotations

import dataclasses
import logging
import pathlib
import time

import torch
from safetensors import SafetensorError, safe_open
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    AutoTokenizer,
    GenerationConfig,
    PreTrainedModel,
    PreTrainedTokenizerBase,
)

from .weight_cache import WeightCache

_LOG = logging.getLogger(__name__)

_DTYPES = {"bfloat16": torch.bfloat16, "float32": torch.float32}


@dataclasses.dataclass
class LoadedModel:
    model: PreTrainedModel  # a *ForCausalLM in eval mode (the engine repacks it in place)
    tokenizer: PreTrainedTokenizerBase
    name: str  # the model's own name (folder / file stem / hub id)
    eos_token_ids: frozenset[int]
    dtype: torch.dtype  # of the loaded weights
    weight_cache: WeightCache | None = None  # where the runner stores its packed weights
    # The packed weights read from weight_cache; `model` is then a skeleton on the meta device.
    packed: dict[str, torch.Tensor] | None = None


def model_name(source: str) -> str:
    path = pathlib.Path(source)
    if path.suffix == ".gguf":
        return path.stem
    if path.exists():
        return path.resolve().name
    return source  # hub id, e.g. Qwen/Qwen2.5-0.5B-Instruct


def load_from_gguf(gguf_path: pathlib.Path, dtype: torch.dtype) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """Dequantize a GGUF into a plain (serializable) transformers model.

    transformers' GGUF path returns a model tagged with a quantizer that refuses
    save_pretrained(); rebuilding it from the config and its state dict gives an
    ordinary model."""
    folder, name = str(gguf_path.parent), gguf_path.name
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    gguf_model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=dtype)
    config = gguf_model.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    missing, unexpected = model.load_state_dict(gguf_model.state_dict(), strict=False)
    # Tied or buffer-only keys may legitimately differ; real weights must not.
    missing = [k for k in missing if not k.endswith("rotary_emb.inv_freq")]
    if missing or unexpected:
        raise RuntimeError(f"GGUF conversion mismatch: missing={missing} unexpected={unexpected}")
    return model, tokenizer


def check_weight_files(folder: pathlib.Path) -> None:
    """Open every safetensors file's header: a truncated or corrupt file is
    refused here with its name (ValueError: qwen-serve exits 2) instead of
    failing deep inside from_pretrained. The header check covers truncation:
    it verifies that the tensors it lists fit in the file."""
    for file in sorted(folder.glob("*.safetensors")):
        try:
            with safe_open(str(file), framework="pt"):
                pass
        except (SafetensorError, OSError) as exc:
            raise ValueError(f"cannot read the weights file {file}: {exc}") from exc


def load_model(
    source: str, dtype: str = "bfloat16", quantization: str | None = None, weight_cache_dir: str = ""
) -> LoadedModel:
    """With a weight_cache_dir and the quantization the runner will use, a
    valid cache of the packed weights replaces reading the checkpoint's."""
    start = time.monotonic()
    torch_dtype = _DTYPES[dtype]
    path = pathlib.Path(source)
    cache = packed = None
    model: PreTrainedModel
    tokenizer: PreTrainedTokenizerBase
    if weight_cache_dir and quantization is not None and path.is_dir():  # a model folder (not .gguf)
        cache = WeightCache(pathlib.Path(weight_cache_dir), source, dtype, quantization)
        packed = cache.load()
    if packed is not None:
        tokenizer = AutoTokenizer.from_pretrained(source)
        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(source), dtype=torch_dtype)
        try:  # from_pretrained reads it too: it holds the end-of-sequence ids
            model.generation_config = GenerationConfig.from_pretrained(source)
        except OSError:
            pass
    elif path.suffix == ".gguf":
        if not path.is_file():
            raise FileNotFoundError(f"model file not found: {source}")
        model, tokenizer = load_from_gguf(path, torch_dtype)
    else:
        if not path.exists() and (source.startswith((".", "/", "~")) or source.count("/") != 1):
            raise FileNotFoundError(f"model folder not found: {source} (run `make model`?)")
        config = AutoConfig.from_pretrained(source)
        if getattr(config, "model_type", None) != "qwen2":
            raise ValueError(f"unsupported model type {config.model_type!r}: this server runs Qwen2-family models")
        tokenizer = AutoTokenizer.from_pretrained(source)
        if path.is_dir():
            check_weight_files(path)
        model = AutoModelForCausalLM.from_pretrained(source, dtype=torch_dtype)
    model.eval()
    if getattr(model.config, "use_sliding_window", False):
        raise ValueError("sliding-window attention is not supported")
    if tokenizer.chat_template is None:
        raise ValueError("the tokenizer has no chat template")
    eos = set()
    gen_eos = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    im_end = tokenizer.get_vocab().get("<|im_end|>")
    for ids in (gen_eos, tokenizer.eos_token_id, im_end):
        if isinstance(ids, int):
            eos.add(ids)
        elif ids:
            eos.update(i for i in ids if isinstance(i, int))
    _LOG.info("loaded %s (%s) in %.1fs", source, dtype, time.monotonic() - start)
    return LoadedModel(
        model=model,
        tokenizer=tokenizer,
        name=model_name(source),
        eos_token_ids=frozenset(eos),
        dtype=torch_dtype,
        weight_cache=cache,
        packed=packed,
    )
