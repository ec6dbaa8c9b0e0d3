"""The engine's AVX2 int8 kernel (service/engine/native): built where it can
be, bit for bit the torch path, batch- and thread-invariant, and never used
when built from another source."""

from __future__ import annotations

import shutil

import pytest
import torch
from torch import nn

from service.engine import native
from service.engine.model_runner import RowwiseInt8Linear

CAN_BUILD = native.cpu_has_avx2() and shutil.which("cc") is not None
needs_kernel = pytest.mark.skipif(not native.available(), reason="no AVX2 int8 kernel on this machine")


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
@pytest.mark.parametrize("rows", [1, 2, 3, 33, 70])
def test_matches_the_torch_path_bit_for_bit(outputs, depth, bias, rows):
    layer = RowwiseInt8Linear(nn.Linear(depth, outputs, bias=bias))
    x = _inputs(rows, depth, seed=rows)
    expected = layer.torch_forward(x)
    assert torch.equal(native.int8_linear(x, layer.weight, layer.float_scale, layer.bias), expected)
    assert torch.equal(layer(x), expected)  # the module takes the kernel


@needs_kernel
def test_a_row_is_the_same_alone_in_any_batch_and_on_any_thread_count():
    layer = RowwiseInt8Linear(nn.Linear(896, 1152))
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
def test_refuses_operands_it_cannot_multiply():
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
