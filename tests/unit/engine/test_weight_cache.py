"""The packed-weights cache: the cached path computes exactly what a fresh
packing does; a corrupted, stale or unwritable cache is never used."""

from __future__ import annotations

import os
import pathlib
import shutil

import pytest
import torch

from service.engine.config import EngineConfig
from service.engine.loader import load_model
from service.engine.model_runner import ModelRunner

PROMPT = list(range(3, 40))


def runner(model_dir, cache_dir, quantization: str = "int8") -> tuple[ModelRunner, bool]:
    """A runner and whether its weights came from the cache."""
    loaded = load_model(str(model_dir), "bfloat16", quantization, str(cache_dir))
    from_cache = loaded.packed is not None
    return ModelRunner(
        loaded, EngineConfig.defaults(max_batch_size=1, max_model_len=128, quantization=quantization)
    ), from_cache


@pytest.fixture
def model_dir(tiny_model_dir, tmp_path) -> pathlib.Path:
    """A private copy (tests change its files), read-only like the container's mount."""
    copy = shutil.copytree(tiny_model_dir, tmp_path / "model")
    for path in [copy, *copy.iterdir()]:
        path.chmod(0o555 if path.is_dir() else 0o444)
    yield copy
    copy.chmod(0o755)


@pytest.mark.parametrize("quantization", ["int8", "int5", "int8-weight-only", "int4", "none"])
def test_cached_weights_give_bit_identical_logits(model_dir, tmp_path, quantization):
    files_before = sorted(model_dir.iterdir())
    fresh, from_cache = runner(model_dir, tmp_path / "cache", quantization)
    assert not from_cache
    assert len(list((tmp_path / "cache").glob("*.safetensors"))) == 1
    cached, from_cache = runner(model_dir, tmp_path / "cache", quantization)
    assert from_cache
    assert torch.equal(fresh.prefill(0, PROMPT, 0), cached.prefill(0, PROMPT, 0))
    assert torch.equal(fresh.decode([7], [len(PROMPT)]), cached.decode([7], [len(PROMPT)]))
    assert sorted(model_dir.iterdir()) == files_before, "the model folder must never be written"


@pytest.mark.parametrize("damage", ["truncate", "garble"])
def test_a_corrupted_cache_is_detected_and_rebuilt(model_dir, tmp_path, damage):
    fresh, _ = runner(model_dir, tmp_path)
    (path,) = tmp_path.glob("*.safetensors")
    data = path.read_bytes()
    if damage == "truncate":
        path.write_bytes(data[: len(data) // 2])
    else:  # same length, a run of bytes in the tensor data changed
        middle = len(data) // 2
        path.write_bytes(data[:middle] + bytes(b ^ 0x5A for b in data[middle : middle + 64]) + data[middle + 64 :])
    rebuilt, from_cache = runner(model_dir, tmp_path)
    assert not from_cache
    assert torch.equal(fresh.prefill(0, PROMPT, 0), rebuilt.prefill(0, PROMPT, 0))
    _, from_cache = runner(model_dir, tmp_path)
    assert from_cache, "the rebuilt cache should be valid"


def test_a_changed_model_or_setting_never_reads_a_stale_cache(model_dir, tmp_path):
    runner(model_dir, tmp_path, "int8")
    _, from_cache = runner(model_dir, tmp_path, "int8-weight-only")
    assert not from_cache
    weights = model_dir / "model.safetensors"
    stat = weights.stat()
    os.utime(weights, ns=(stat.st_atime_ns, stat.st_mtime_ns + 1_000_000_000))  # a new checkpoint
    _, from_cache = runner(model_dir, tmp_path, "int8")
    assert not from_cache


def test_an_unwritable_cache_folder_only_costs_the_speed_up(model_dir, tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    first, from_cache = runner(model_dir, blocker / "cache")  # cannot be created
    assert not from_cache
    second, from_cache = runner(model_dir, blocker / "cache")
    assert not from_cache
    assert torch.equal(first.prefill(0, PROMPT, 0), second.prefill(0, PROMPT, 0))
