"""A cache of the runner's packed (repacked, quantized) weights, so a replica
reads them back instead of loading and quantizing the checkpoint at every
start (README: Performance, start-up).

One safetensors file per (model files, dtype, quantization, format), named by
a hash of all of them: a changed model file, setting, torch version or packing
format gives a new name, so a stale file is never read. The hash and a byte
sum of every tensor are stored in the file and checked on load; a file that
fails any check is ignored and written again. Writes go to a temporary file
renamed into place, so a reader never sees half a file. The cache folder may
be read-only or missing: the server then packs at start as without a cache.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import pathlib
import tempfile

import torch
from safetensors import safe_open
from safetensors.torch import save_file

_LOG = logging.getLogger(__name__)

# Bump when the packed layout changes (tensor names, shapes, quantization code).
FORMAT_VERSION = 2


def _model_files(source: pathlib.Path) -> list[pathlib.Path]:
    if source.is_file():
        return [source]
    return sorted(p for p in source.iterdir() if p.is_file())


def _byte_sum(tensor: torch.Tensor) -> int:
    """A cheap integrity check (~0.1 s for the whole model): catches truncated,
    zeroed or garbled data, not a swap of two bytes."""
    return int(tensor.contiguous().view(-1).view(torch.uint8).sum(dtype=torch.int64))


class WeightCache:
    def __init__(self, directory: pathlib.Path, source: str, dtype: str, quantization: str) -> None:
        self.quantization = quantization
        identity = {
            "format": FORMAT_VERSION,
            "torch": torch.__version__,
            "dtype": dtype,
            "quantization": quantization,
            "files": [
                (path.name, stat.st_size, stat.st_mtime_ns)
                for path in _model_files(pathlib.Path(source))
                for stat in [path.stat()]
            ],
        }
        self.key = hashlib.sha256(json.dumps(identity).encode()).hexdigest()
        name = pathlib.Path(source).resolve().name
        self.path = pathlib.Path(directory) / f"{name}-{quantization}-{dtype}-{self.key[:16]}.safetensors"

    def load(self) -> dict[str, torch.Tensor] | None:
        """The packed tensors, or None when there is no valid cache file."""
        if not self.path.is_file():
            return None
        try:
            with safe_open(str(self.path), framework="pt") as file:
                metadata = file.metadata() or {}
                if metadata.get("key") != self.key:
                    raise ValueError("written for other model files or settings")
                sums = json.loads(metadata["byte_sums"])
                tensors = {name: file.get_tensor(name) for name in file.keys()}
            if sums.keys() != tensors.keys() or any(_byte_sum(t) != sums[n] for n, t in tensors.items()):
                raise ValueError("contents do not match their checksums")
        except Exception as exc:  # noqa: BLE001 - any unreadable cache is rebuilt
            _LOG.warning("ignoring the packed-weights cache %s (%s); packing again", self.path, exc)
            return None
        _LOG.info("packed weights from %s", self.path)
        return tensors

    def store(self, tensors: dict[str, torch.Tensor]) -> None:
        """Write the packed tensors; a failure (read-only folder, full disk) is
        logged, never raised: the server runs without the cache."""
        tensors = {name: t.contiguous() for name, t in tensors.items()}
        metadata = {"key": self.key, "byte_sums": json.dumps({n: _byte_sum(t) for n, t in tensors.items()})}
        temporary = None
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            handle, temporary = tempfile.mkstemp(dir=self.path.parent, prefix=".packing-", suffix=".tmp")
            os.close(handle)
            save_file(tensors, temporary, metadata=metadata)
            os.replace(temporary, self.path)
            temporary = None
            _LOG.info("packed weights cached in %s", self.path)
        except OSError as exc:
            _LOG.warning("cannot cache the packed weights in %s (%s): every start packs them again", self.path, exc)
        finally:
            if temporary is not None:
                pathlib.Path(temporary).unlink(missing_ok=True)


def main() -> None:
    """Write the cache ahead of time, e.g. where the model is fetched, so that
    every replica starts from it. Pass the settings the server will run with."""
    import argparse

    from .config import EngineConfig
    from .kernels import resolve_quantization
    from .loader import load_model
    from .model_runner import ModelRunner

    parser = argparse.ArgumentParser(description=main.__doc__)
    parser.add_argument("--model", required=True)
    parser.add_argument("--dtype", required=True)
    parser.add_argument("--quantization", required=True)
    parser.add_argument("--weight-cache-dir", required=True)
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO)
    # `auto` packs for the kernel this machine would choose (the cache file names the result).
    quantization = resolve_quantization(args.quantization, EngineConfig.defaults().threads)
    loaded = load_model(args.model, args.dtype, quantization, args.weight_cache_dir)
    ModelRunner(loaded, EngineConfig.defaults(max_batch_size=1, max_model_len=16, quantization=quantization))


if __name__ == "__main__":
    main()
