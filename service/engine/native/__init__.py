"""The engine's own CPU kernel: the int8 Linear on AVX2 (int8_matmul.c).

`int8_matmul.c` is compiled once into `_int8_matmul.so` next to it by
`python -m service.engine.native` (`make setup` does it; the Docker image
installs the library built on the host). The engine loads it with ctypes
when the CPU has AVX2, and otherwise keeps torch._int_mm: a missing or stale
library (built from another source), or one for another architecture, makes
int8 slower, never wrong."""

from __future__ import annotations

import ctypes
import functools
import hashlib
import logging
import pathlib
import platform
import shutil
import subprocess
import sys
import tempfile

import torch

_LOG = logging.getLogger(__name__)

SOURCE = pathlib.Path(__file__).with_name("int8_matmul.c")
LIBRARY = pathlib.Path(__file__).with_name("_int8_matmul.so")
# -ffp-contract=off: no fused multiply-add, so the scaling rounds as torch's does.
COMPILE_FLAGS = ("-O3", "-mavx2", "-mfma", "-fopenmp", "-ffp-contract=off", "-shared", "-fPIC")


def build(source: pathlib.Path = SOURCE, library: pathlib.Path = LIBRARY, compiler: str = "cc") -> pathlib.Path:
    """Compile the kernel (about a second). Written to a temporary name and
    renamed, so a running server never loads a half-written file."""
    if shutil.which(compiler) is None:
        raise RuntimeError(f"no C compiler ({compiler}) to build {source.name}")
    with tempfile.NamedTemporaryFile(dir=library.parent, suffix=".so", delete=False) as partial:
        partial_path = pathlib.Path(partial.name)
    try:
        digest = f'-DSOURCE_SHA256="{source_sha256(source)}"'
        subprocess.run([compiler, *COMPILE_FLAGS, digest, "-o", str(partial_path), str(source)], check=True)
        partial_path.replace(library)
    finally:
        partial_path.unlink(missing_ok=True)
    return library


def source_sha256(source: pathlib.Path = SOURCE) -> str:
    return hashlib.sha256(source.read_bytes()).hexdigest()


def _x86_64() -> bool:
    return platform.machine().lower() in ("x86_64", "amd64")


def cpu_has_avx2() -> bool:
    if not _x86_64():
        return False
    try:
        flags = pathlib.Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return " avx2" in flags and " fma" in flags


def _load(library: pathlib.Path, source: pathlib.Path) -> ctypes.CDLL | None:
    if not cpu_has_avx2():
        return None
    if not library.exists():
        _LOG.info("native int8 kernel not built (%s): int8 uses torch._int_mm; `make setup` builds it", library)
        return None
    # torch is imported (above) first: the kernel's libgomp.so.1 then resolves
    # to the copy torch has loaded, so both share one OpenMP runtime and pool.
    try:
        lib = ctypes.CDLL(str(library))
    except OSError as error:  # another architecture, a broken file
        _LOG.warning("native int8 kernel %s not loadable (%s): int8 uses torch._int_mm", library, error)
        return None
    lib.qwen_source_sha256.restype = ctypes.c_char_p
    if lib.qwen_source_sha256().decode() != source_sha256(source):
        _LOG.warning("native int8 kernel %s was built from another source: not used; `make setup` rebuilds it", library)
        return None
    function = lib.qwen_int8_linear
    pointer, size = ctypes.c_void_p, ctypes.c_int64
    function.argtypes = [pointer, size, size, pointer, pointer, pointer, size, pointer, ctypes.c_int]
    function.restype = ctypes.c_int
    return lib


@functools.cache
def _library() -> ctypes.CDLL | None:
    return _load(LIBRARY, SOURCE)


def available() -> bool:
    """Whether int8 products run on the native kernel here."""
    return _library() is not None


def int8_linear(
    x: torch.Tensor, weight: torch.Tensor, weight_scale: torch.Tensor, bias: torch.Tensor | None
) -> torch.Tensor:
    """x [M, K] float32 -> [M, N] float32: x quantized to int8 with one scale
    per row, times weight [N, K] int8 with weight_scale [N] (float32), plus
    bias [N] (float32) if given. Bit for bit what RowwiseInt8Linear computes
    with torch ops. Only when available()."""
    lib = _library()
    if lib is None:
        raise RuntimeError("the native int8 kernel is not available")
    rows, depth = x.shape
    outputs = weight.shape[0]
    if weight.shape[1] != depth or weight_scale.shape != (outputs,) or (bias is not None and bias.shape != (outputs,)):
        raise ValueError(f"shapes do not match: x {tuple(x.shape)}, weight {tuple(weight.shape)}")
    if x.dtype != torch.float32 or weight.dtype != torch.int8 or weight_scale.dtype != torch.float32:
        raise TypeError(f"float32 x, int8 weight and float32 scales expected, got {x.dtype}, {weight.dtype}")
    x = x.contiguous()
    out = torch.empty(rows, outputs, dtype=torch.float32)
    status = lib.qwen_int8_linear(
        x.data_ptr(),
        rows,
        depth,
        weight.data_ptr(),
        weight_scale.data_ptr(),
        None if bias is None else bias.data_ptr(),
        outputs,
        out.data_ptr(),
        torch.get_num_threads(),
    )
    if status != 0:
        raise MemoryError("the native int8 kernel could not allocate its buffers")
    return out


def main() -> None:
    """python -m service.engine.native: build the kernel. Without a C compiler
    or off x86-64 there is nothing to build, which is not an error: int8 then
    uses torch._int_mm."""
    if not _x86_64():
        print(f"native int8 kernel: x86-64 only; nothing to build on {platform.machine()}")
        return
    try:
        print(f"built {build()}")
    except RuntimeError as error:  # no compiler
        print(f"native int8 kernel: {error}; int8 will use torch._int_mm")
    except subprocess.CalledProcessError as error:
        sys.exit(f"native int8 kernel did not compile: {error}")
