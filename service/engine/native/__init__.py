"""The engine's own CPU kernels on AVX2, and AVX512-VNNI and AMX where the CPU
has them (int8_matmul.c): the int8 and int5 Linears, and the decoder stack of a
forward pass in one call (DecoderStack); and an exit at SIGTERM that needs
no GIL, for the model's load (exit_at_signals).

`int8_matmul.c` is compiled once into `_int8_matmul.so` next to it by
`python -m service.engine.native` (`make setup` does it; the Docker image
installs the library built on the host). The engine loads it with ctypes
when the CPU has AVX2, and otherwise keeps torch._int_mm: a missing or stale
library (built from another source), or one for another architecture, makes
int8 slower, never wrong."""

from __future__ import annotations

import ctypes
import dataclasses
import functools
import hashlib
import logging
import pathlib
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence

import torch
import torch.nn.functional as F

from ..cpu import cpu_flags

_LOG = logging.getLogger(__name__)

SOURCE = pathlib.Path(__file__).with_name("int8_matmul.c")
LIBRARY = pathlib.Path(__file__).with_name("_int8_matmul.so")
# -ffp-contract=off: no fused multiply-add, so the scaling rounds as torch's does.
COMPILE_FLAGS = ("-O3", "-mavx2", "-mfma", "-mf16c", "-fopenmp", "-ffp-contract=off", "-shared", "-fPIC")


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
    return _x86_64() and {"avx2", "fma", "f16c"} <= cpu_flags()


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
    function = lib.qwen_int5_linear
    function.argtypes = [pointer, size, size, pointer, pointer, pointer, pointer, size, pointer, ctypes.c_int]
    function.restype = ctypes.c_int
    lib.qwen_set_vnni.argtypes = [ctypes.c_int]
    lib.qwen_set_vnni.restype = ctypes.c_int
    lib.qwen_uses_vnni.restype = ctypes.c_int
    lib.qwen_set_amx.argtypes = [ctypes.c_int]
    lib.qwen_set_amx.restype = ctypes.c_int
    lib.qwen_uses_amx.restype = ctypes.c_int
    function = lib.qwen_forward
    function.argtypes = [
        ctypes.POINTER(_Model),
        pointer,
        size,
        pointer,
        pointer,
        ctypes.c_int,
        ctypes.POINTER(ctypes.c_float),
    ]
    function.restype = ctypes.c_int
    function = lib.qwen_exit_at_signals
    function.argtypes = [ctypes.POINTER(ctypes.c_int), ctypes.c_int, ctypes.c_char_p, ctypes.c_int64]
    function.restype = ctypes.c_int
    return lib


@functools.cache
def _library() -> ctypes.CDLL | None:
    return _load(LIBRARY, SOURCE)


def available() -> bool:
    """Whether int8 products run on the native kernel here."""
    return _library() is not None


def use_vnni(wanted: bool = True) -> bool:
    """Let products of several rows run on the AVX512-VNNI kernels (the
    default where the CPU has them) or keep them on AVX2; returns whether
    they do. Both give the same bits: tests and benchmarks compare the two.
    Not for a running engine: a product already under way may mix them."""
    lib = _library()
    return lib is not None and bool(lib.qwen_set_vnni(int(wanted)))


def use_amx(wanted: bool = True) -> bool:
    """Let int8 products of 16 rows or more run on the AMX tile kernel (the
    default where the CPU and the OS have AMX, while the VNNI kernels are
    used) or keep them on VNNI; returns whether they do. The same bits
    either way; not for a running engine (as use_vnni)."""
    lib = _library()
    return lib is not None and bool(lib.qwen_set_amx(int(wanted)))


def instruction_set() -> str:
    """What the int8 and int5 products run on: "avx512-amx" (as
    avx512-vnni, and int8 products of 16 rows or more on AMX tiles),
    "avx512-vnni", "avx2", or "none" (no native kernels: torch's)."""
    lib = _library()
    if lib is None:
        return "none"
    if lib.qwen_uses_amx():
        return "avx512-amx"
    return "avx512-vnni" if lib.qwen_uses_vnni() else "avx2"


def exit_at_signals(signals: Sequence[int], line: str) -> bool:
    """Have these signals end the process in their handler, without the GIL:
    write `line` to stderr after the time (logging's asctime, local time; ""
    writes nothing), then exit 0. For the model's load, whose calls hold the
    GIL for a second at a time (int8_matmul.c); signal.signal takes a signal
    back. False where the library is not available (nothing changed)."""
    lib = _library()
    if lib is None:
        return False
    numbers, text = (ctypes.c_int * len(signals))(*signals), line.encode()
    if lib.qwen_exit_at_signals(numbers, len(signals), text, time.localtime().tm_gmtoff):
        raise ValueError(f"cannot exit at signals {list(signals)} with a line of {len(text)} bytes")
    return True


def _product(
    kernel: str, x: torch.Tensor, weights: tuple[torch.Tensor, ...], bias: torch.Tensor | None, outputs: int
) -> torch.Tensor:
    """One call of a kernel, (x, rows, depth, *weights, bias, outputs, out, threads), on checked operands."""
    lib = _library()
    if lib is None:
        raise RuntimeError("the native kernels are not available")
    function = getattr(lib, kernel)
    x = x.contiguous()
    rows, depth = x.shape
    out = torch.empty(rows, outputs, dtype=torch.float32)
    pointers = [weight.data_ptr() for weight in weights]
    bias_pointer = None if bias is None else bias.data_ptr()
    if function(x.data_ptr(), rows, depth, *pointers, bias_pointer, outputs, out.data_ptr(), torch.get_num_threads()):
        raise MemoryError("the native kernel could not allocate its buffers")
    return out


def int8_linear(
    x: torch.Tensor, weight: torch.Tensor, weight_scale: torch.Tensor, bias: torch.Tensor | None
) -> torch.Tensor:
    """x [M, K] float32 -> [M, N] float32: x quantized to int8 with one scale
    per row, times weight [N, K] int8 with weight_scale [N] (float32), plus
    bias [N] (float32) if given. Bit for bit what RowwiseInt8Linear computes
    with torch ops. Only when available()."""
    depth = x.shape[1]
    outputs = weight.shape[0]
    if weight.shape[1] != depth or weight_scale.shape != (outputs,) or (bias is not None and bias.shape != (outputs,)):
        raise ValueError(f"shapes do not match: x {tuple(x.shape)}, weight {tuple(weight.shape)}")
    if x.dtype != torch.float32 or weight.dtype != torch.int8 or weight_scale.dtype != torch.float32:
        raise TypeError(f"float32 x, int8 weight and float32 scales expected, got {x.dtype}, {weight.dtype}")
    return _product("qwen_int8_linear", x, (weight, weight_scale), bias, outputs)


INT5_BLOCK = 32


def int5_superblocks(blocks: int) -> list[int]:
    """The blocks of each superblock of a row of `blocks` blocks: 8s, then one
    each of 4, 2 and 1 as needed (int8_matmul.c: superblock_size)."""
    return [8] * (blocks // 8) + [size for size in (4, 2, 1) if blocks % 8 & size]


@functools.cache
def _int5_widths(depth: int) -> tuple[int, int, int]:
    """Bytes of nibbles, bytes of fifth bits and float16 scales per weight row
    of `depth` inputs (a multiple of 32): 32 per 2 vectors, 32 per 8, 8 per superblock."""
    blocks = depth // INT5_BLOCK
    return -(-blocks // 2) * 32, -(-blocks // 8) * 32, 8 * len(int5_superblocks(blocks))


def int5_order(depth: int) -> torch.Tensor:
    """The input index at each position of the int5 kernel's order (int8_matmul.c:
    lane l of vector v of a superblock of g blocks holds inputs
    4 * (v * 8 / g + l / g) + 0..3 of its block l % g)."""
    order = []
    first = 0
    for size in int5_superblocks(depth // INT5_BLOCK):
        vector, lane, byte = torch.meshgrid(torch.arange(size), torch.arange(8), torch.arange(4), indexing="ij")
        order.append(first + 32 * (lane % size) + 4 * (vector * (8 // size) + lane // size) + byte)
        first += 32 * size
    return torch.cat([part.reshape(-1) for part in order])


def int5_pack(weight: torch.Tensor, rows_per_block: int = 4096) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """[N, K] weights (K a multiple of 32) -> the int5 kernel's (nibbles, fifth,
    scales), laid out as int8_matmul.c describes. Rounded as GGUF's Q5_0 is: a
    block's scale is its value of largest magnitude / -16 (as float16), its
    codes round(w / scale) + 16, clamped to 0..31. A block of rows at a time,
    so packing needs little more memory than its result."""
    rows, depth = weight.shape
    if depth % INT5_BLOCK:
        raise ValueError(f"int5 needs a multiple of {INT5_BLOCK} inputs, got {depth}")
    blocks = depth // INT5_BLOCK
    order = int5_order(depth)
    # Lane l of a superblock of g blocks starting at block b takes block b + l % g's scale.
    lane_blocks, first = [], 0
    for size in int5_superblocks(blocks):
        lane_blocks.append(first + torch.arange(8) % size)
        first += size
    scale_index = torch.cat(lane_blocks)
    nibble_width, fifth_width, scale_width = _int5_widths(depth)
    # On the meta device (a skeleton whose packed weights come from the weight cache) only the shapes matter.
    nibbles = torch.empty(rows, nibble_width, dtype=torch.uint8, device=weight.device)
    fifth = torch.empty(rows, fifth_width, dtype=torch.uint8, device=weight.device)
    scales = torch.empty(rows, scale_width, dtype=torch.float16, device=weight.device)
    if weight.is_meta:
        return nibbles, fifth, scales
    bit_weights = (1 << torch.arange(8, dtype=torch.int32)).view(1, 1, 8, 1)
    for start in range(0, rows, rows_per_block):
        block = weight[start : start + rows_per_block].float().view(-1, blocks, INT5_BLOCK)
        count = len(block)
        peak = block.gather(2, block.abs().argmax(dim=2, keepdim=True))
        scale = (peak / -16).to(torch.float16)
        inverse = torch.where(scale != 0, 1 / scale.float(), torch.zeros((), dtype=torch.float32))
        codes = (torch.round(block * inverse) + 16).clamp(0, 31).to(torch.int32).view(count, depth)[:, order]
        vectors = codes.view(count, blocks, INT5_BLOCK)
        pairs = F.pad(vectors, (0, 0, 0, -blocks % 2)).view(count, -1, 2, INT5_BLOCK)
        nibbles[start : start + count] = ((pairs[:, :, 0] & 15) | ((pairs[:, :, 1] & 15) << 4)).view(count, -1)
        octets = F.pad(vectors >> 4, (0, 0, 0, -blocks % 8)).view(count, -1, 8, INT5_BLOCK)
        fifth[start : start + count] = (octets * bit_weights).sum(dim=2).view(count, -1)
        scales[start : start + count] = scale.view(count, blocks)[:, scale_index]
    return nibbles, fifth, scales


def int5_linear(
    x: torch.Tensor, nibbles: torch.Tensor, fifth: torch.Tensor, scales: torch.Tensor, bias: torch.Tensor | None
) -> torch.Tensor:
    """x [M, K] float32 -> [M, N] float32: x quantized to int8 with one scale
    per row (as for int8_linear), times the int5 weights from int5_pack, plus
    bias [N] (float32) if given. Only when available()."""
    depth = x.shape[1]
    outputs = scales.shape[0]
    nibble_width, fifth_width, scale_width = _int5_widths(depth)
    if (
        depth % INT5_BLOCK
        or scales.shape != (outputs, scale_width)
        or nibbles.shape != (outputs, nibble_width)
        or fifth.shape != (outputs, fifth_width)
        or (bias is not None and bias.shape != (outputs,))
    ):
        raise ValueError(f"shapes do not match: x {tuple(x.shape)}, scales {tuple(scales.shape)}")
    if x.dtype != torch.float32 or nibbles.dtype != torch.uint8 or scales.dtype != torch.float16:
        raise TypeError(f"float32 x, uint8 codes and float16 scales expected, got {x.dtype}, {scales.dtype}")
    return _product("qwen_int5_linear", x, (nibbles, fifth, scales), bias, outputs)


class _Linear(ctypes.Structure):
    _fields_ = [
        ("weights", ctypes.c_void_p * 3),
        ("bias", ctypes.c_void_p),
        ("n", ctypes.c_int64),
        ("int5", ctypes.c_int),
    ]


class _Layer(ctypes.Structure):
    _fields_ = [
        ("input_norm", ctypes.c_void_p),
        ("post_norm", ctypes.c_void_p),
        ("qkv", _Linear),
        ("o_proj", _Linear),
        ("gate_up", _Linear),
        ("down", _Linear),
    ]


class _Model(ctypes.Structure):
    _fields_ = [
        *((name, ctypes.c_int64) for name in ("layers", "hidden", "heads", "kv_heads", "head_dim", "intermediate")),
        ("slots", ctypes.c_int64),
        ("max_len", ctypes.c_int64),
        ("eps", ctypes.c_float),
        ("kv_bf16", ctypes.c_int),
        ("layer", ctypes.POINTER(_Layer)),
        ("kv_cache", ctypes.c_void_p),
        ("cos", ctypes.c_void_p),
        ("sin_signed", ctypes.c_void_p),
    ]


@dataclasses.dataclass(frozen=True)
class LinearOperands:
    """A packed Linear as the kernels take it: int8 (weight [n, k] int8, scale
    [n] float32) or int5 (nibbles, fifth, scales from int5_pack), and its bias."""

    weights: tuple[torch.Tensor, ...]
    bias: torch.Tensor | None

    @property
    def int5(self) -> bool:
        return len(self.weights) == 3


@dataclasses.dataclass(frozen=True)
class LayerOperands:
    input_norm: torch.Tensor
    qkv: LinearOperands
    o_proj: LinearOperands
    post_norm: torch.Tensor
    gate_up: LinearOperands
    down: LinearOperands


class DecoderStack:
    """A Qwen2 model's decoder layers, run by the native kernel in one call
    per forward pass (int8_matmul.c: qwen_forward) over the model runner's KV
    cache [layers, slots, 2, kv_heads, max_len, head_dim] (float32 or
    bfloat16) and rotary tables [max_len, head_dim]. Holds the tensors whose
    addresses it passes."""

    def __init__(
        self,
        layers: Sequence[LayerOperands],
        heads: int,
        intermediate: int,
        eps: float,
        kv_cache: torch.Tensor,
        cos: torch.Tensor,
        sin_signed: torch.Tensor,
    ) -> None:
        count, slots, _, kv_heads, max_len, head_dim = kv_cache.shape
        hidden = layers[0].input_norm.shape[0]
        int5 = any(linear.int5 for layer in layers for linear in (layer.qkv, layer.o_proj, layer.gate_up, layer.down))
        tensors = [kv_cache, cos, sin_signed]
        for layer in layers:
            tensors += [layer.input_norm, layer.post_norm]
            for linear in (layer.qkv, layer.o_proj, layer.gate_up, layer.down):
                tensors += [*linear.weights, *([] if linear.bias is None else [linear.bias])]
        if not supports(hidden, heads, kv_heads, head_dim, intermediate, int5):
            raise ValueError(f"no native forward pass for these shapes (hidden {hidden}, head_dim {head_dim})")
        if kv_cache.dtype not in (torch.float32, torch.bfloat16) or cos.shape != (max_len, head_dim):
            raise ValueError(f"unsupported KV cache {kv_cache.dtype} or rotary tables {tuple(cos.shape)}")
        if not all(tensor.is_contiguous() for tensor in tensors):
            raise ValueError("the native forward pass needs contiguous tensors")
        self._tensors = tensors
        self._layers = (_Layer * count)(*(self._layer(layer) for layer in layers))
        self._model = _Model(
            layers=count,
            hidden=hidden,
            heads=heads,
            kv_heads=kv_heads,
            head_dim=head_dim,
            intermediate=intermediate,
            slots=slots,
            max_len=max_len,
            eps=eps,
            kv_bf16=int(kv_cache.dtype == torch.bfloat16),
            layer=self._layers,
            kv_cache=kv_cache.data_ptr(),
            cos=cos.data_ptr(),
            sin_signed=sin_signed.data_ptr(),
        )
        self._slots, self._max_len, self._hidden = slots, max_len, hidden

    @staticmethod
    def _linear(operands: LinearOperands) -> _Linear:
        weights = [weight.data_ptr() for weight in operands.weights] + [0] * (3 - len(operands.weights))
        bias = None if operands.bias is None else operands.bias.data_ptr()
        return _Linear((ctypes.c_void_p * 3)(*weights), bias, operands.weights[-1].shape[0], int(operands.int5))

    def _layer(self, layer: LayerOperands) -> _Layer:
        return _Layer(
            layer.input_norm.data_ptr(),
            layer.post_norm.data_ptr(),
            *(self._linear(linear) for linear in (layer.qkv, layer.o_proj, layer.gate_up, layer.down)),
        )

    def forward(self, hidden: torch.Tensor, positions: Sequence[int], slots: Sequence[int], threads: int) -> float:
        """Run every layer over hidden [rows, hidden] (float32, contiguous; the
        embedded tokens, replaced by the last layer's output) in place, on
        `threads` threads. Row r is the token at positions[r] of cache slot
        slots[r]: its keys and values are stored there, and it attends to
        that slot's positions 0..positions[r] (rows of one slot see each
        other's keys). Returns the least share of the pass's wall time that
        any of its threads spent running (threads.ThreadGovernor)."""
        rows = len(positions)
        if hidden.shape != (rows, self._hidden) or hidden.dtype != torch.float32 or not hidden.is_contiguous():
            raise ValueError(f"hidden states [{rows}, {self._hidden}] float32 expected, got {tuple(hidden.shape)}")
        if len(slots) != rows or not all(0 <= slot < self._slots for slot in slots):
            raise ValueError(f"slots out of range: {list(slots)}")
        if not all(0 <= position < self._max_len for position in positions):
            raise ValueError(f"positions out of range: {list(positions)}")
        lib = _library()
        assert lib is not None  # a DecoderStack is only built where available()
        positions_array = (ctypes.c_int64 * rows)(*positions)
        slots_array = (ctypes.c_int64 * rows)(*slots)
        on_cpu = ctypes.c_float()
        if lib.qwen_forward(
            ctypes.byref(self._model),
            hidden.data_ptr(),
            rows,
            positions_array,
            slots_array,
            threads,
            ctypes.byref(on_cpu),
        ):
            raise MemoryError("the native forward pass could not allocate its buffers")
        return on_cpu.value


def supports(hidden: int, heads: int, kv_heads: int, head_dim: int, intermediate: int, int5: bool) -> bool:
    """Whether qwen_forward runs a model of these shapes here: vectors of 8
    floats, at most 128 per head, whole int5 blocks."""
    multiple = 32 if int5 else 8
    return (
        available()
        and heads % kv_heads == 0
        and head_dim % 8 == 0
        and head_dim <= 128
        and all(size % multiple == 0 for size in (hidden, intermediate, heads * head_dim))
    )


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
