from __future__ import annotations

import os
import pathlib
import sys

import pytest

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

from tiny_model import build_tiny_model  # noqa: E402


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory: pytest.TempPathFactory) -> pathlib.Path:
    """A random two-layer Qwen2 with a byte-level BPE tokenizer and ChatML."""
    return build_tiny_model(tmp_path_factory.mktemp("tiny-qwen2"))


@pytest.fixture(scope="session")
def real_model_dir() -> pathlib.Path:
    from service.config import default_model_path

    path = pathlib.Path(default_model_path())
    if not (path / "config.json").is_file():
        pytest.fail(f"real model missing at {path}: run `make model` (make test does)")
    return path
