"""The engine's AVX2 kernels (service/engine/native): built where they can be;
int8 bit for bit the torch path; int5 GGUF Q5_0's rounding in the layout
int8_matmul.c describes and the product of exactly those weights; both
batch- and thread-invariant, and never used when built from another source.
Where the CPU has AVX512-VNNI, its kernels are used and give the AVX2 bits.
Its signal handler exits at SIGTERM while Python's code cannot run."""

from __future__ import annotations

import datetime
import os
import re
import shutil
import subprocess
import sys
import time

import pytest
import torch
from torch import nn

from service.engine import native
from service.engine.cpu import cpu_flags
from service.engine.model_runner import Int5Linear, RowwiseInt8Linear

CAN_BUILD = native.cpu_has_avx2() and shutil.which("cc") is not None
needs_kernel = pytest.mark.skipif(not native.available(), reason="no AVX2 kernels on this machine")


# What the VNNI kernels are compiled for (int8_matmul.c: AVX512_VNNI), as /proc/cpuinfo names it.
CPU_HAS_VNNI = native.cpu_has_avx2() and {"avx512f", "avx512vl", "avx512bw", "avx512_vnni"} <= cpu_flags()
needs_vnni = pytest.mark.skipif(not (native.available() and CPU_HAS_VNNI), reason="no AVX512-VNNI on this CPU")
# AMX's tile registers and int8 tile products (Linux grants them to any process that asks).
CPU_HAS_AMX = CPU_HAS_VNNI and {"avx512dq", "amx_tile", "amx_int8"} <= cpu_flags()
needs_amx = pytest.mark.skipif(not (native.available() and CPU_HAS_AMX), reason="no AMX on this CPU")
# What instruction_set() names with every kernel allowed.
CPU_KERNELS = "avx512-amx" if CPU_HAS_AMX else "avx512-vnni" if CPU_HAS_VNNI else "avx2"


@pytest.mark.skipif(not CAN_BUILD, reason="needs x86-64 with AVX2 and a C compiler")
def test_the_kernel_is_built_and_loaded_where_it_can_be():
    # `make setup` builds it; a machine that can build it must be using it.
    assert native.available()


def _inputs(rows: int, depth: int, seed: int) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(rows, depth, generator=generator) * 3
    x[0, 1] = 4000.0  # Qwen's massive activations: one channel dwarfs the row
    if rows > 2:
        x[1] = 0.0  # amax 0: the scale's floor
        # scale 1.0, values exactly between two integers: round half to even
        x[2, :5] = torch.tensor([127.0, 0.5, 1.5, 2.5, -0.5])
        x[2, 5:] = 0.0
    return x


@needs_kernel
@pytest.mark.parametrize(
    "outputs,depth,bias",
    [(1152, 896, True), (896, 4864, False), (37, 70, True), (5, 16, False)],
    ids=["qkv", "down", "odd-sizes", "tiny"],
)
@pytest.mark.parametrize("rows", [1, 2, 3, 33, 70, 130])  # 130: three row blocks
def test_matches_the_torch_path_bit_for_bit(outputs, depth, bias, rows):
    layer = RowwiseInt8Linear(nn.Linear(depth, outputs, bias=bias))
    x = _inputs(rows, depth, seed=rows)
    expected = layer.torch_forward(x)
    assert torch.equal(native.int8_linear(x, layer.weight, layer.float_scale, layer.bias), expected)
    assert torch.equal(layer(x), expected)  # the module takes the kernel


@needs_kernel
@pytest.mark.parametrize("linear", [RowwiseInt8Linear, Int5Linear])
def test_a_row_is_the_same_alone_in_any_batch_and_on_any_thread_count(linear):
    layer = linear(nn.Linear(896, 1152))
    x = _inputs(40, 896, seed=7)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        single_thread = layer(x)
    finally:
        torch.set_num_threads(threads)
    batch = layer(x)
    assert torch.equal(batch, single_thread)
    for row in (0, 2, 39):
        assert torch.equal(layer(x[row : row + 1]), batch[row : row + 1])


@needs_kernel
def test_int8_refuses_operands_it_cannot_multiply():
    layer = RowwiseInt8Linear(nn.Linear(64, 32))
    with pytest.raises(ValueError, match="shapes"):
        native.int8_linear(torch.randn(2, 63), layer.weight, layer.float_scale, None)
    with pytest.raises(TypeError, match="float32"):
        native.int8_linear(torch.randn(2, 64, dtype=torch.bfloat16), layer.weight, layer.float_scale, None)


@pytest.mark.skipif(not CAN_BUILD, reason="needs x86-64 with AVX2 and a C compiler")
def test_a_library_built_from_another_source_is_not_used(tmp_path):
    edited = tmp_path / "int8_matmul.c"
    edited.write_text(native.SOURCE.read_text() + "\n/* edited */\n")
    library = native.build(source=edited, library=tmp_path / "_int8_matmul.so")
    assert native._load(library, edited) is not None
    assert native._load(library, native.SOURCE) is None
    assert native._load(tmp_path / "missing.so", native.SOURCE) is None


# A server's first steps: Python's handler for SIGTERM (asyncio's), then the
# native one. sum() of a long range is one C call holding the GIL, during
# which Python runs no signal handler.
EXIT_AT_SIGTERM = """
import signal, sys
from service.engine import native
signal.signal(signal.SIGTERM, lambda *_: sys.exit(3))
assert native.exit_at_signals([signal.SIGTERM], " INFO qwen_grpc: gone\\n")
"""


def _python(code: str, **kwargs) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    return subprocess.Popen([sys.executable, "-c", code], env=env, text=True, **kwargs)


@needs_kernel
def test_sigterm_exits_0_at_once_while_a_call_holds_the_gil():
    holding = EXIT_AT_SIGTERM + 'print("holding", flush=True)\nsum(range(10**12))\n'
    process = _python(holding, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        assert process.stdout is not None and process.stdout.readline() == "holding\n"
        time.sleep(0.2)  # into sum()
        process.terminate()
        sent = time.monotonic()
        _, stderr = process.communicate(timeout=30)
        took = time.monotonic() - sent
    finally:
        process.kill()
    assert process.returncode == 0 and took < 1.0, (process.returncode, took, stderr)
    # logging's line: local time with milliseconds, level, logger, message
    line = re.fullmatch(r"(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d),\d{3} INFO qwen_grpc: gone\n", stderr)
    assert line is not None, stderr
    written = datetime.datetime.strptime(line.group(1), "%Y-%m-%d %H:%M:%S")
    assert abs((written - datetime.datetime.now()).total_seconds()) < 60, line.group(1)


@needs_kernel
def test_signal_signal_takes_sigterm_back():
    process = _python(
        EXIT_AT_SIGTERM
        + "signal.signal(signal.SIGTERM, lambda *_: sys.exit(3))\nsignal.raise_signal(signal.SIGTERM)\n",
        stderr=subprocess.PIPE,
    )
    _, stderr = process.communicate(timeout=60)
    assert process.returncode == 3 and stderr == "", (process.returncode, stderr)


# Input sizes covering every superblock shape: 8 blocks, and tails of 4, 2 and 1.
DEPTHS = [32, 64, 128, 224, 480, 896, 4864]


def unpack(nibbles: torch.Tensor, fifth: torch.Tensor, scales: torch.Tensor, depth: int) -> torch.Tensor:
    """The weights the packed form stands for, float64 [N, depth], decoded
    from the layout as documented (written independently of int5_pack)."""
    rows, blocks = nibbles.shape[0], depth // 32
    weights = torch.empty(rows, depth, dtype=torch.float64)
    vector = 0
    sizes = [8] * (blocks // 8) + [size for size in (4, 2, 1) if blocks % 8 & size]
    for superblock, size in enumerate(sizes):
        for v in range(size):
            chunk = nibbles[:, (vector >> 1) * 32 : (vector >> 1) * 32 + 32].long()
            low = (chunk >> 4) & 15 if vector & 1 else chunk & 15
            high = (fifth[:, (vector >> 3) * 32 : (vector >> 3) * 32 + 32].long() >> (vector & 7)) & 1
            codes = low | (high << 4)
            for lane in range(8):
                block = lane % size
                scale = scales[:, superblock * 8 + lane].double()
                first = 32 * (vector - v) + 32 * block + 4 * (v * (8 // size) + lane // size)
                weights[:, first : first + 4] = (codes[:, 4 * lane : 4 * lane + 4] - 16).double() * scale[:, None]
            vector += 1
    return weights


def q5_0_weights(rows: int, depth: int, seed: int) -> torch.Tensor:
    """Weights on a Q5_0 grid: per block a float16 scale d and codes 0..31
    standing for (c - 16) * d, with code 0 (-16 d, the largest magnitude) in
    each block, as GGUF's quantizer leaves them."""
    generator = torch.Generator().manual_seed(seed)
    scales = (torch.rand(rows, depth // 32, 1, generator=generator) * 0.01 + 1e-4).half().double()
    codes = torch.randint(1, 32, (rows, depth // 32, 32), generator=generator)
    codes[:, :, 5] = 0
    return ((codes - 16).double() * scales).view(rows, depth)


@needs_kernel
@pytest.mark.parametrize("depth", DEPTHS)
def test_packing_a_q5_0_tensor_keeps_it_exactly(depth):
    weights = q5_0_weights(19, depth, seed=depth)
    nibbles, fifth, scales = native.int5_pack(weights.float())
    assert torch.equal(unpack(nibbles, fifth, scales, depth), weights)


@needs_kernel
def test_packing_rounds_to_the_nearest_code_of_a_block_scale_from_its_largest_value():
    block = torch.zeros(1, 32)
    block[0, :4] = torch.tensor([-3.2, 0.09, 0.16, -0.26])  # scale -3.2 / -16 = 0.2
    nibbles, fifth, scales = native.int5_pack(block)
    decoded = unpack(nibbles, fifth, scales, 32)[0, :4]
    scale = torch.tensor(0.2).half().double()
    assert torch.equal(decoded, torch.tensor([-16.0, 0.0, 1.0, -1.0], dtype=torch.float64) * scale)
    positive = native.int5_pack(-block)  # a positive peak: the scale is negative, codes still fit 0..31
    assert torch.equal(unpack(*positive, 32)[0, :4], -decoded)


@needs_kernel
@pytest.mark.parametrize("depth", DEPTHS)
@pytest.mark.parametrize("rows", [1, 2, 3, 33, 70, 130])  # 130: three row blocks
def test_multiplies_the_packed_weights_by_the_row_quantized_activations(depth, rows):
    outputs = 37
    weights = torch.randn(outputs, depth, generator=torch.Generator().manual_seed(depth)) * 0.05
    bias = torch.randn(outputs)
    nibbles, fifth, scales = native.int5_pack(weights)
    x = _inputs(rows, depth, seed=rows)
    row_scale = x.abs().amax(dim=1, keepdim=True).clamp(min=1e-8) / 127
    quantized = torch.round(x / row_scale).double()
    expected = quantized @ unpack(nibbles, fifth, scales, depth).t() * row_scale.double() + bias.double()
    got = native.int5_linear(x, nibbles, fifth, scales, bias)
    # Exact integer sums per block; float32 only in the scaling and the sum over blocks.
    torch.testing.assert_close(got.double(), expected, rtol=1e-5, atol=1e-5 * float(expected.abs().max()))


@needs_kernel
@pytest.mark.parametrize("depth", DEPTHS)
@pytest.mark.parametrize("rows", [4, 5, 40, 130])
def test_int5_rows_together_equal_rows_alone(depth, rows):
    # From 5 rows a row block takes int5_many_rows (codes decoded once per
    # block), fewer take int5_tile: every row must come out the same bits,
    # whichever of several row blocks (130 rows: three) it is in.
    nibbles, fifth, scales = native.int5_pack(torch.randn(37, depth, generator=torch.Generator().manual_seed(depth)))
    bias = torch.randn(37)
    x = _inputs(rows, depth, seed=depth + rows)
    together = native.int5_linear(x, nibbles, fifth, scales, bias)
    alone = torch.cat([native.int5_linear(x[row : row + 1], nibbles, fifth, scales, bias) for row in range(rows)])
    assert torch.equal(together, alone)


@needs_kernel
def test_integer_operands_give_exact_integer_results():
    depth, outputs = 896, 64
    generator = torch.Generator().manual_seed(3)
    codes = torch.randint(0, 32, (outputs, depth), generator=generator)
    codes[:, ::32] = 0  # -16: every block's scale is exactly 1
    weights = (codes - 16).float()
    x = torch.randint(-127, 128, (5, depth), generator=generator).float()
    x[:, 0] = 127.0  # row scale 1: the activations are their own int8 codes
    got = native.int5_linear(x, *native.int5_pack(weights), None)
    assert torch.equal(got, (x.double() @ weights.double().t()).float())


@needs_kernel
def test_int5_refuses_operands_it_cannot_multiply():
    nibbles, fifth, scales = native.int5_pack(torch.randn(32, 64))
    with pytest.raises(ValueError, match="shapes"):
        native.int5_linear(torch.randn(2, 96), nibbles, fifth, scales, None)
    with pytest.raises(TypeError, match="float32"):
        native.int5_linear(torch.randn(2, 64, dtype=torch.bfloat16), nibbles, fifth, scales, None)
    with pytest.raises(ValueError, match="multiple of 32"):
        native.int5_pack(torch.randn(4, 70))


@needs_kernel
def test_the_vnni_kernels_run_exactly_where_the_cpu_has_them():
    try:
        assert native.use_vnni(True) is CPU_HAS_VNNI
        assert native.instruction_set() == CPU_KERNELS
        assert native.use_vnni(False) is False
        assert native.instruction_set() == "avx2"  # AMX too goes with VNNI off
    finally:
        native.use_vnni(True)


@needs_kernel
def test_the_amx_kernel_runs_exactly_where_the_cpu_has_it():
    try:
        assert native.use_amx(True) is CPU_HAS_AMX
        assert native.instruction_set() == CPU_KERNELS
        assert native.use_amx(False) is False
        assert native.instruction_set() == ("avx512-vnni" if CPU_HAS_VNNI else "avx2")
    finally:
        native.use_amx(True)


def _on_avx2_and_on_vnni(product) -> tuple[torch.Tensor, torch.Tensor]:
    try:
        native.use_vnni(False)
        avx2 = product()
        assert native.use_vnni(True)
        native.use_amx(False)
        return avx2, product()
    finally:
        native.use_vnni(True)
        native.use_amx(True)


@needs_vnni
@pytest.mark.parametrize("depth", DEPTHS)
@pytest.mark.parametrize("rows", [1, 2, 3, 4, 5, 7, 16, 33, 70, 130])
@pytest.mark.parametrize("outputs", [36, 37])  # 37: the last tile has one weight row
def test_int5_on_vnni_gives_the_avx2_bits(depth, rows, outputs):
    nibbles, fifth, scales = native.int5_pack(torch.randn(outputs, depth, generator=torch.Generator().manual_seed(9)))
    bias = torch.randn(outputs) if rows % 2 else None
    x = _inputs(rows, depth, seed=depth + rows)
    avx2, vnni = _on_avx2_and_on_vnni(lambda: native.int5_linear(x, nibbles, fifth, scales, bias))
    assert torch.equal(vnni, avx2)


@needs_amx
@pytest.mark.parametrize("depth", [64, 896, 4864, 96])  # 96: not a multiple of 64, stays on VNNI
@pytest.mark.parametrize("rows", [15, 16, 17, 32, 33, 130])  # 15: fewer than a tile's rows, stays on VNNI
@pytest.mark.parametrize("outputs", [32, 1152, 36])  # 36: not a multiple of 16, stays on VNNI
def test_int8_on_amx_gives_the_vnni_bits(depth, rows, outputs):
    # Two row blocks share each weight tile, one alone splits its inputs over two tiles (16, 33 and
    # 130 rows end with a block alone; 17, 33 and 130 with a padded one); every output then takes
    # the 16 x 16 transposition.
    layer = RowwiseInt8Linear(nn.Linear(depth, outputs, bias=rows % 2 == 1))
    x = _inputs(rows, depth, seed=depth + rows)
    try:
        native.use_amx(False)
        vnni = native.int8_linear(x, layer.weight, layer.float_scale, layer.bias)
        assert native.use_amx(True)
        amx = native.int8_linear(x, layer.weight, layer.float_scale, layer.bias)
    finally:
        native.use_amx(True)
    assert torch.equal(amx, vnni)
    assert torch.equal(amx, layer.torch_forward(x))


@needs_vnni
@pytest.mark.parametrize("depth", [32, 224, 896, 4864, 70])  # 70: not a multiple of 32, stays on AVX2
@pytest.mark.parametrize("rows", [1, 2, 3, 5, 16, 33, 70, 130])
@pytest.mark.parametrize("outputs", [36, 37])  # 37: not a multiple of 4, stays on AVX2
def test_int8_on_vnni_gives_the_avx2_bits(depth, rows, outputs):
    layer = RowwiseInt8Linear(nn.Linear(depth, outputs, bias=rows % 2 == 1))
    x = _inputs(rows, depth, seed=depth + rows)
    avx2, vnni = _on_avx2_and_on_vnni(lambda: native.int8_linear(x, layer.weight, layer.float_scale, layer.bias))
    assert torch.equal(vnni, avx2)
    assert torch.equal(vnni, layer.torch_forward(x))
