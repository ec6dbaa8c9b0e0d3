"""The forward pass of a Qwen2 model over a slot-based KV cache.

The cache is preallocated: one slot per concurrently decoded request, each
`max_model_len` positions long. Decoding requests always occupy slots
0..B-1 (the scheduler keeps them compact), so a decode step attends over a
view of the cache, never a gather.

The runner repacks the transformer's weights once: q/k/v become one Linear
and gate/up another, so a step makes 4 matrix products per layer instead of
7 (for int8, 4 activation quantizations instead of 7). The norms are the
model's own modules.

For int8 and int5 on the native kernels the decoder layers run in one C
call per step (native.DecoderStack): at one decoding row the ~30 torch
operations a layer took about as long as the matrix products themselves.
The torch layers stay for the other quantizations and as its reference.
"""

from __future__ import annotations

import ctypes
import dataclasses
import math
import mmap
import time
from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from . import native
from .config import EngineConfig
from .kernels import resolve_quantization
from .loader import LoadedModel
from .threads import ThreadGovernor


@dataclasses.dataclass(frozen=True)
class PrefillChunk:
    """Prompt tokens to run at positions start.. into one KV-cache slot."""

    slot: int
    token_ids: Sequence[int]
    start: int

    @property
    def end(self) -> int:
        return self.start + len(self.token_ids)


_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}
# Keys per block of the CPU attention kernel (flash attention's kv split).
_KV_BLOCK = 512


def _fuse(*linears: nn.Linear) -> nn.Linear:
    """One Linear whose output is the concatenation of the given ones'."""
    weight = torch.cat([lin.weight.data for lin in linears], dim=0)
    has_bias = linears[0].bias is not None
    fused = nn.Linear(weight.shape[1], weight.shape[0], bias=has_bias, dtype=weight.dtype, device=weight.device)
    fused.weight.data = weight
    if has_bias:
        fused.bias.data = torch.cat([lin.bias.data for lin in linears], dim=0)
    return fused


def _int8_rows(weight: torch.Tensor, rows_per_block: int = 4096) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric int8 with one float32 scale per row (amax / 127), a block of
    rows at a time: the float32 copy is a few MB, not the whole matrix (the
    151936-row output layer is 545 MB in float32)."""
    ints = torch.empty(weight.shape, dtype=torch.int8, device=weight.device)
    scales = torch.empty(weight.shape[0], device=weight.device)
    for start in range(0, weight.shape[0], rows_per_block):
        block = weight[start : start + rows_per_block].float()
        scale = block.abs().amax(dim=1).clamp(min=1e-8) / 127.0
        ints[start : start + len(block)] = torch.round(block / scale[:, None]).clamp(-127, 127)
        scales[start : start + len(block)] = scale
    return ints, scales


class Int8WeightOnlyLinear(nn.Module):
    """int8 weights with one scale per output channel; activations keep their
    dtype. Half the weight bytes of bf16 (decode is bound by reading weights)
    with almost no accuracy cost, since activations are not quantized."""

    # The CPU kernel is fast with bf16 activations and slow with float32 ones,
    # so float32 callers are served through bf16.
    compute_dtype = torch.bfloat16
    # Buffers (register_buffer), declared for the type checker.
    weight: torch.Tensor
    float_scale: torch.Tensor
    scale: torch.Tensor
    bias: torch.Tensor | None

    def __init__(self, linear: nn.Linear) -> None:
        super().__init__()
        weight, float_scale = _int8_rows(linear.weight.data)
        self.register_buffer("weight", weight)
        self.register_buffer("float_scale", float_scale)
        self.register_buffer("scale", float_scale.to(self.compute_dtype))
        self.register_buffer("bias", None if linear.bias is None else linear.bias.data.to(self.compute_dtype))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        flat = x.reshape(-1, x.shape[-1]).to(self.compute_dtype)
        out = torch._weight_int8pack_mm(flat, self.weight, self.scale)
        if self.bias is not None:
            out = out + self.bias
        return out.to(x.dtype).view(*x.shape[:-1], out.shape[-1])


class RowwiseInt8Linear(Int8WeightOnlyLinear):
    """The same int8 weights; activations quantized to int8 with one scale
    per row (token), products in int8: on the engine's own AVX2 kernel when it
    is built and the CPU has AVX2 (service/engine/native), else torch._int_mm.
    Both give the same bits.

    One scale per row makes a row's output depend on that row alone: the
    integer products are exact, and everything else is elementwise. With one
    scale per tensor (fbgemm's dynamic Linear) a token's numbers, and so a
    request's text, changed with whatever else shared the batch. Per row also
    keeps Qwen's massive activations (a few tokens, a few channels, values in
    the thousands) from crushing the other rows' precision."""

    def __init__(self, linear: nn.Linear) -> None:
        super().__init__(linear)
        self.bias = None if linear.bias is None else linear.bias.data.float()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        flat = x.reshape(-1, x.shape[-1]).float()
        if native.available():
            out = native.int8_linear(flat, self.weight, self.float_scale, self.bias)
        else:
            out = self.torch_forward(flat)
        return out.to(x.dtype).view(*x.shape[:-1], out.shape[-1])

    def operands(self) -> native.LinearOperands:
        return native.LinearOperands((self.weight, self.float_scale), self.bias)

    def torch_forward(self, flat: torch.Tensor) -> torch.Tensor:
        """The product with torch ops, [M, K] float32 -> [M, N] float32."""
        row_scale = flat.abs().amax(dim=1, keepdim=True).clamp(min=1e-8) / 127.0
        quantized = torch.round(flat / row_scale).to(torch.int8)
        out = torch._int_mm(quantized, self.weight.t()).float() * (row_scale * self.float_scale)
        if self.bias is not None:
            out = out + self.bias
        return out


class Int5Linear(nn.Module):
    """5-bit weights, a float16 scale per block of 32 inputs (GGUF's Q5_0
    rounding), activations quantized to int8 per row as for int8; on the
    engine's AVX2 kernel (service/engine/native), which int5 needs. 5.5 bits a
    weight against int8's 8: fewer bytes to read per token, and its products
    run 32 to an instruction (vpmaddubsw). Each block's integer sum is exact and the scaled sums are added
    in a fixed order: a row's output depends on that row alone."""

    nibbles: torch.Tensor
    fifth: torch.Tensor
    scales: torch.Tensor
    bias: torch.Tensor | None

    def __init__(self, linear: nn.Linear) -> None:
        super().__init__()
        nibbles, fifth, scales = native.int5_pack(linear.weight.data)
        self.register_buffer("nibbles", nibbles)
        self.register_buffer("fifth", fifth)
        self.register_buffer("scales", scales)
        self.register_buffer("bias", None if linear.bias is None else linear.bias.data.float())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        flat = x.reshape(-1, x.shape[-1]).float()
        out = native.int5_linear(flat, self.nibbles, self.fifth, self.scales, self.bias)
        return out.to(x.dtype).view(*x.shape[:-1], out.shape[-1])

    def operands(self) -> native.LinearOperands:
        return native.LinearOperands((self.nibbles, self.fifth, self.scales), self.bias)


def _int4_groups(
    weight: torch.Tensor, group_size: int, dtype: torch.dtype, rows_per_block: int = 4096
) -> tuple[torch.Tensor, torch.Tensor]:
    """Asymmetric 4-bit codes per group of `group_size` inputs (the group's min
    and max map to about 0 and 15), packed for torch's CPU int4 kernel, and the
    groups' [scale, zero] in `dtype` as the kernel wants them:
    w = (q - 8) * scale + zero. The codes are rounded against the scale and zero
    as stored (in dtype), not as computed. A block of rows at a time, like _int8_rows."""
    rows, columns = weight.shape
    codes = torch.empty(weight.shape, dtype=torch.int32, device=weight.device)
    scales_and_zeros = torch.empty(columns // group_size, rows, 2, dtype=dtype, device=weight.device)
    for start in range(0, rows, rows_per_block):
        block = weight[start : start + rows_per_block].float().view(-1, columns // group_size, group_size)
        low, high = block.amin(dim=2), block.amax(dim=2)
        scale = ((high - low) / 15.0).clamp(min=1e-6).to(dtype).float()
        zero = (low + 8 * scale).to(dtype).float()
        code = torch.round((block - zero[..., None]) / scale[..., None] + 8).clamp(0, 15)
        codes[start : start + len(block)] = code.view(len(block), columns).to(torch.int32)
        scales_and_zeros[:, start : start + len(block)] = torch.stack((scale, zero), dim=2).transpose(0, 1).to(dtype)
    return torch.ops.aten._convert_weight_to_int4pack_for_cpu(codes, 1), scales_and_zeros


class Int4Linear(nn.Module):
    """4-bit weights, asymmetric, a scale and a zero per group of 32 inputs;
    bf16 activations (torch's _weight_int4pack_mm_for_cpu: its float32 path is
    scalar, 10-20x slower). 5 bits a weight with the group parameters,
    against int8's 8: decode at small batch is bound by reading weights.
    Batch-invariant: the kernel computes each row alone, in the same order
    whatever the number of rows (tests/unit/engine/test_batch_invariance.py)."""

    compute_dtype = torch.bfloat16

    def __init__(self, linear: nn.Linear, group_size: int = 32) -> None:
        super().__init__()
        self.group_size = group_size
        self.out_features = linear.out_features
        # The kernel packs outputs 16 at a time: zero rows pad the rest (Qwen's shapes need none).
        padded = F.pad(linear.weight.data, (0, 0, 0, -linear.out_features % 16))
        weight, scales_and_zeros = _int4_groups(padded, group_size, self.compute_dtype)
        self.register_buffer("weight", weight)
        self.register_buffer("scales_and_zeros", scales_and_zeros)
        self.register_buffer("bias", None if linear.bias is None else linear.bias.data.to(self.compute_dtype))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        flat = x.reshape(-1, x.shape[-1]).to(self.compute_dtype)
        out = torch.ops.aten._weight_int4pack_mm_for_cpu(flat, self.weight, self.group_size, self.scales_and_zeros)
        out = out[:, : self.out_features]
        if self.bias is not None:
            out = out + self.bias
        return out.to(x.dtype).reshape(*x.shape[:-1], self.out_features)


class Int8Embedding(nn.Module):
    """The token embedding table as int8 with one scale per row: a lookup
    reads one row per token, so this costs nothing in speed and halves the
    table (Qwen2.5-0.5B: 272 MB in bf16, 136 MB in int8)."""

    weight: torch.Tensor
    scale: torch.Tensor

    def __init__(self, embedding: nn.Embedding) -> None:
        super().__init__()
        weight, scale = _int8_rows(embedding.weight.data)
        self.register_buffer("weight", weight)
        self.register_buffer("scale", scale)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.weight[ids].float() * self.scale[ids, None]


def _owned(module: nn.Module) -> nn.Module:
    """Give the module's tensors their own memory. The loader may hand out
    tensors backed by the memory-mapped weights file; once none is left, that
    mapping goes and resident memory is the repacked weights only."""
    for parameter in module.parameters():
        parameter.data = parameter.data.clone()
    return module


def _lazily_zeroed(shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
    """A zero tensor backed by an anonymous memory mapping: the kernel hands out
    zero pages on first touch, so resident memory follows the KV positions
    actually written, not the configured maximum. Zero matters: attention
    also reads masked positions, and uninitialised memory could hold NaN,
    which no mask cancels (0 * NaN is NaN)."""
    nbytes = math.prod(shape) * torch.empty((), dtype=dtype).element_size()
    mapping = mmap.mmap(-1, nbytes, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    return torch.frombuffer(mapping, dtype=dtype).view(shape)


_MADV_DONTNEED = 4  # Linux: private anonymous pages read as zeros again


def _release_pages(tensor: torch.Tensor) -> None:
    """Hand the whole pages of a contiguous piece of a lazily-zeroed mapping
    back to the kernel: they stop counting as resident and read as zeros."""
    page = mmap.PAGESIZE
    start = -(-tensor.data_ptr() // page) * page
    end = (tensor.data_ptr() + tensor.nbytes) // page * page
    if end > start:
        ctypes.CDLL(None).madvise(ctypes.c_void_p(start), ctypes.c_size_t(end - start), _MADV_DONTNEED)


def _operands(linear: nn.Module) -> native.LinearOperands:
    if not isinstance(linear, (RowwiseInt8Linear, Int5Linear)):
        raise TypeError(f"the native layers take int8 and int5 Linears, not {type(linear).__name__}")
    return linear.operands()


class _Block(nn.Module):
    """One transformer layer's packed weights (RMSNorm weights as buffers)."""

    input_norm: torch.Tensor
    post_norm: torch.Tensor

    def __init__(
        self,
        input_norm: torch.Tensor,
        qkv: nn.Module,
        o_proj: nn.Module,
        post_norm: torch.Tensor,
        gate_up: nn.Module,
        down: nn.Module,
    ) -> None:
        super().__init__()
        self.register_buffer("input_norm", input_norm)
        self.register_buffer("post_norm", post_norm)
        self.qkv, self.o_proj, self.gate_up, self.down = qkv, o_proj, gate_up, down


class ModelRunner:
    def __init__(self, loaded: LoadedModel, engine_config: EngineConfig, native_forward: bool = True) -> None:
        """One KV-cache slot per engine_config.max_batch_size, each
        max_model_len positions. Repacks the loaded model's weights, or takes
        them from loaded.packed (read from the weight cache; the model is then
        a skeleton on the meta device). A fresh packing is stored in
        loaded.weight_cache when there is one.

        int8 and int5 run their decoder layers in the native kernel where it
        is built (native.DecoderStack), unless native_forward is False (the
        torch layers: the reference it is tested against)."""
        num_slots, max_model_len = engine_config.max_batch_size, engine_config.max_model_len
        quantization = resolve_quantization(engine_config.quantization, engine_config.threads)
        kv_cache_dtype = engine_config.kv_cache_dtype
        # A Qwen2 *ForCausalLM, taken apart below: nn.Module's attribute
        # lookup gives torch's type checking nothing to check against.
        model: Any = loaded.model
        config = model.config
        if config.hidden_act != "silu":
            raise ValueError(f"unsupported activation {config.hidden_act!r}")
        self.vocab_size = config.vocab_size
        self.num_slots = num_slots
        self.max_model_len = max_model_len
        self.quantization = quantization
        self._num_heads = config.num_attention_heads
        self._num_kv_heads = config.num_key_value_heads
        self._head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
        self._intermediate = config.intermediate_size
        # int8 and int5 compute in float32 (their activations are quantized per call), int4 too (its Linears
        # take bf16 and return float32, so norms and attention keep float32); the others in the loaded dtype.
        self.dtype = torch.float32 if quantization in ("int8", "int5", "int4") else loaded.dtype
        if quantization == "int5" and not native.available():
            raise ValueError(
                "--quantization int5 needs the engine's AVX2 kernel (x86-64 with AVX2, built by `make setup`)"
            )
        pack = {
            "none": _owned,
            "int8": RowwiseInt8Linear,
            "int5": Int5Linear,
            "int8-weight-only": Int8WeightOnlyLinear,
            "int4": Int4Linear,
        }[quantization]
        # int5 keeps the attention projections in int8: 9 % of the weights, and the most sensitive to
        # rounding (the GGUF the model comes from keeps half its value projections at 8 bits). int5
        # everywhere measured +2.8-3.1 % perplexity against bf16 on the quality guard's text, with int8
        # attention +0.9-1.3 % (README: Performance).
        attention_pack = RowwiseInt8Linear if quantization == "int5" else pack

        embed = model.model.embed_tokens
        self._embed = _owned(embed) if quantization == "none" else Int8Embedding(embed)
        self._norm_shape = (config.hidden_size,)
        self._eps = config.rms_norm_eps
        self._norm = self._norm_weight(model.model.norm)
        model.model.norm = None
        self._blocks = []
        for layer in model.model.layers:
            attn, mlp = layer.self_attn, layer.mlp
            self._blocks.append(
                _Block(
                    input_norm=self._norm_weight(layer.input_layernorm),
                    qkv=attention_pack(_fuse(attn.q_proj, attn.k_proj, attn.v_proj)),
                    o_proj=attention_pack(attn.o_proj),
                    post_norm=self._norm_weight(layer.post_attention_layernorm),
                    gate_up=pack(_fuse(mlp.gate_proj, mlp.up_proj)),
                    down=pack(mlp.down_proj),
                )
            )
            # Drop the originals as we go so peak memory stays near one copy,
            # and none is left holding on to the loader's mapping of the weights file.
            layer.self_attn = layer.mlp = layer.input_layernorm = layer.post_attention_layernorm = None
        lm_head = model.lm_head
        if lm_head.weight is embed.weight and quantization == "none":
            # tied: the head needs its own copy (int8 packing makes one itself)
            lm_head = nn.Linear(
                lm_head.in_features,
                lm_head.out_features,
                bias=False,
                dtype=lm_head.weight.dtype,
                device=lm_head.weight.device,
            )
            lm_head.weight.data = embed.weight.data.clone()  # embed is self._embed: _owned() keeps the module
        self._lm_head = pack(lm_head)
        model.lm_head = model.model.embed_tokens = None
        self._weights = nn.Module()
        self._weights.embed, self._weights.lm_head = self._embed, self._lm_head
        self._weights.blocks = nn.ModuleList(self._blocks)
        self._weights.register_buffer("norm", self._norm)
        cache = loaded.weight_cache
        if cache is not None and cache.quantization != quantization:
            raise ValueError(f"the weight cache is for {cache.quantization!r}, not {quantization!r}")
        if loaded.packed is not None:
            self._weights.load_state_dict(loaded.packed, strict=True, assign=True)
            self._norm = self._weights.get_buffer("norm")
            loaded.packed = None
        elif cache is not None:
            cache.store(self.packed_weights())

        self._qk_size = (self._num_heads + self._num_kv_heads) * self._head_dim
        # Keys and values of a layer side by side, so one indexed write stores both.
        shape = (len(self._blocks), num_slots, 2, self._num_kv_heads, max_model_len, self._head_dim)
        # "auto" keeps the compute dtype. A bfloat16 cache next to float32
        # compute (int8) halves the cache at a small cost in attention speed
        # and precision (README: Performance).
        self._kv_dtype = self.dtype if kv_cache_dtype == "auto" else _DTYPES[kv_cache_dtype]
        self._kv_cache = _lazily_zeroed(shape, self._kv_dtype)
        with torch.inference_mode():
            positions = torch.arange(max_model_len).unsqueeze(0)
            probe = torch.zeros(1, dtype=self.dtype)
            # A fresh rotary table: the model's own may be a meta-device skeleton.
            cos, sin = type(model.model.rotary_emb)(config=config)(probe, positions)
        half = self._head_dim // 2
        self._cos = cos[0].to(self.dtype)  # [max_model_len, head_dim]
        # rotate_half(x) * sin == roll(x, half) * sin with its first half negated.
        self._sin_signed = torch.cat((-sin[0, :, :half], sin[0, :, half:]), dim=-1).to(self.dtype)
        self._positions = torch.arange(max_model_len)
        self._stack = self._decoder_stack() if native_forward else None
        self._governor = ThreadGovernor(engine_config.threads)

    @property
    def compute_threads(self) -> int:
        """Threads of the next forward pass: the configured count, or fewer
        while the thread governor sees the host withholding cores (it hears
        only of native passes, so the torch layers keep the configured count)."""
        return self._governor.threads

    @property
    def kv_cache_dtype(self) -> str:
        """The KV cache's element type: float32, bfloat16, ..."""
        return str(self._kv_dtype).removeprefix("torch.")

    @property
    def kernels(self) -> str:
        """What the Linears' products run on: the native kernels' instruction
        set (avx512-amx, avx512-vnni, avx2), or torch."""
        if self.quantization in ("int8", "int5") and native.available():
            return native.instruction_set()
        return "torch"

    @property
    def native_layers(self) -> bool:
        """Whether the decoder layers run in the native kernel (native.DecoderStack)."""
        return self._stack is not None

    def _decoder_stack(self) -> native.DecoderStack | None:
        """The native decoder layers, where the kernel runs this model's shapes and packing."""
        if self.quantization not in ("int8", "int5") or not native.supports(
            self._norm_shape[0],
            self._num_heads,
            self._num_kv_heads,
            self._head_dim,
            self._intermediate,
            int5=self.quantization == "int5",
        ):
            return None
        layers = [
            native.LayerOperands(
                input_norm=block.input_norm,
                qkv=_operands(block.qkv),
                o_proj=_operands(block.o_proj),
                post_norm=block.post_norm,
                gate_up=_operands(block.gate_up),
                down=_operands(block.down),
            )
            for block in self._blocks
        ]
        return native.DecoderStack(
            layers,
            heads=self._num_heads,
            intermediate=self._intermediate,
            eps=self._eps,
            kv_cache=self._kv_cache,
            cos=self._cos,
            sin_signed=self._sin_signed,
        )

    def packed_weights(self) -> dict[str, torch.Tensor]:
        """Every packed weight by name (what the weight cache stores)."""
        return self._weights.state_dict()

    def release_slot(self, slot: int) -> None:
        """Return a free slot's cache pages to the OS, so resident memory
        follows the positions held by running requests, not the most ever
        held at once (16 x 1000-token prompts left 415 MB resident for good).
        Costs ~7 ms per 1000 positions: the release, and the zero-page faults
        when the slot is written again."""
        for layer in self._kv_cache:  # [slots, 2, heads, len, dim]: one slot is contiguous
            _release_pages(layer[slot])

    def _norm_weight(self, norm: nn.Module) -> torch.Tensor:
        return norm.get_parameter("weight").data.to(self.dtype, copy=True)

    @property
    def kv_bytes_per_token(self) -> int:
        return 2 * len(self._blocks) * self._num_kv_heads * self._head_dim * self._kv_cache.element_size()

    def prefill(self, slot: int, token_ids: Sequence[int], start: int) -> torch.Tensor:
        """Run prompt tokens at positions start.. into `slot`; return the logits
        (float32, [vocab]) for the position after the last one."""
        return self.step([], [], [PrefillChunk(slot, token_ids, start)])[0]

    def perplexity(self, token_ids: Sequence[int], slot: int = 0) -> float:
        """exp(mean next-token cross-entropy) of a text, scored in one pass (quality checks)."""
        logits = self.step([], [], [PrefillChunk(slot, token_ids, 0)], logit_rows=range(len(token_ids) - 1))
        return math.exp(F.cross_entropy(logits, torch.tensor(token_ids[1:])).item())

    def decode(self, token_ids: Sequence[int], positions: Sequence[int]) -> torch.Tensor:
        """One token for each of the B requests in slots 0..B-1; float32 logits [B, vocab]."""
        return self.step(token_ids, positions, [])

    @torch.inference_mode()
    def step(
        self,
        decode_tokens: Sequence[int],
        decode_positions: Sequence[int],
        chunks: Sequence[PrefillChunk],
        logit_rows: Sequence[int] | None = None,
    ) -> torch.Tensor:
        """One forward pass over a mixed batch: one new token for each of the
        B decoding requests (slots 0..B-1, in order) and any number of prompt
        chunks, all through the same matrix products (for small batches the
        cost of a step is reading the weights once, whatever rides along).

        Returns float32 logits: one row per decoding request, then one per
        chunk (after its last token); or the rows of the packed tokens given
        in logit_rows."""
        batch = len(decode_tokens)
        token_ids = list(decode_tokens)
        positions = list(decode_positions)
        slots = list(range(batch))
        for chunk in chunks:
            token_ids.extend(chunk.token_ids)
            positions.extend(range(chunk.start, chunk.end))
            slots.extend([chunk.slot] * len(chunk.token_ids))
        hidden = self._embed(torch.tensor(token_ids)).to(self.dtype)  # [rows, hidden]
        if self._stack is not None:
            threads = self._governor.next_threads()
            if threads != torch.get_num_threads():
                torch.set_num_threads(threads)  # the output layer's product follows
            start = time.perf_counter()
            on_cpu = self._stack.forward(hidden, positions, slots, threads)
            self._governor.record(on_cpu, time.perf_counter() - start)
        else:
            hidden = self._torch_layers(hidden, positions, slots, batch, chunks)
        if logit_rows is None:
            logit_rows = list(range(batch))
            end = batch
            for chunk in chunks:
                end += len(chunk.token_ids)
                logit_rows.append(end - 1)
        return self._lm_head(self._rms_norm(hidden[list(logit_rows)], self._norm)).float()

    def _torch_layers(
        self, hidden: torch.Tensor, positions: list[int], slots: list[int], batch: int, chunks: Sequence[PrefillChunk]
    ) -> torch.Tensor:
        """The decoder layers in torch operations (see step): the last layer's output."""
        position_index = torch.tensor(positions)
        slot_index = torch.tensor(slots)
        rows = len(hidden)
        # Rotary tables per row, broadcast over the heads.
        cos = self._cos[position_index].unsqueeze(1)
        sin = self._sin_signed[position_index].unsqueeze(1)
        attention = self._attention_plan(batch, position_index[:batch], chunks)
        for layer, block in enumerate(self._blocks):
            qkv = block.qkv(self._rms_norm(hidden, block.input_norm))
            # Rotate queries and keys in one go: [rows, heads + kv_heads, head_dim].
            qk = qkv[:, : self._qk_size].view(rows, -1, self._head_dim)
            qk = qk * cos + qk.roll(self._head_dim // 2, dims=-1) * sin
            kv = torch.cat((qk[:, self._num_heads :], qkv[:, self._qk_size :].view(rows, -1, self._head_dim)), 1)
            self._kv_cache[layer, slot_index, :, :, position_index] = kv.view(rows, 2, self._num_kv_heads, -1).to(
                self._kv_dtype
            )
            queries = qk[:, : self._num_heads].to(self._kv_dtype)
            keys, values = self._kv_cache[layer, :, 0], self._kv_cache[layer, :, 1]
            parts = [part(queries, keys, values) for part in attention]
            attn_out = (parts[0] if len(parts) == 1 else torch.cat(parts)).to(self.dtype)
            hidden = hidden + block.o_proj(attn_out)
            gate_up = block.gate_up(self._rms_norm(hidden, block.post_norm))
            hidden = hidden + block.down(F.silu(gate_up[:, : self._intermediate]) * gate_up[:, self._intermediate :])
        return hidden

    def _rms_norm(self, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        return F.rms_norm(x, self._norm_shape, weight, self._eps)

    def _attention_plan(self, batch: int, decode_positions: torch.Tensor, chunks: Sequence[PrefillChunk]) -> list:
        """Attention for each part of the packed rows, as closures over
        (queries [rows, heads, d], keys, values [slots, kv_heads, max_len, d])
        returning [part rows, heads * d]. Masks are built once per step."""
        plan = []
        if batch:
            plan.append(self._rows_attention(slice(0, batch), slice(0, batch), decode_positions))
        first = batch
        for chunk in chunks:
            # Each prompt token is attended to as a decoded one would be (its
            # slot's keys as a stride-0 batch, no copy): the same kernel call
            # per row, so a token's numbers do not depend on how its prompt
            # was split into chunks, nor on whether it was decoded or prefilled.
            rows = slice(first, first + len(chunk.token_ids))
            slot = slice(chunk.slot, chunk.slot + 1)
            plan.append(self._rows_attention(rows, slot, self._positions[chunk.start : chunk.end]))
            first = rows.stop
        return plan

    def _rows_attention(self, rows: slice, slots: slice, positions: torch.Tensor):
        """Attention of query rows at `positions` over the cached keys of
        `slots` (one slot per row, or one slot for all rows).

        Batch-invariant by construction: the query heads sharing a KV head go
        in as the rows of one query (one position each, so one mask fits all;
        no GQA expansion of the keys), and the keys span whole blocks of
        _KV_BLOCK positions. The CPU kernel reduces over keys a block at a
        time; in a full block a row's masked keys add exact zeros, and a block
        wholly past the row is an exact no-op. A shorter span would make a
        row's sums depend on the longest sequence in the batch (the matrix
        product's summation order changes with its length)."""
        count = rows.stop - rows.start
        span = min(-(-(int(positions.max()) + 1) // _KV_BLOCK) * _KV_BLOCK, self.max_model_len)
        mask = (self._positions[:span] <= positions.unsqueeze(1)).view(count, 1, 1, span)
        shape = (count, self._num_kv_heads, span, self._head_dim)

        def attend(queries, keys, values):
            grouped = queries[rows].view(count, self._num_kv_heads, -1, self._head_dim)
            out = F.scaled_dot_product_attention(
                grouped, keys[slots, :, :span].expand(shape), values[slots, :, :span].expand(shape), attn_mask=mask
            )
            return out.reshape(count, -1)

        return attend

    def slot_positions(self, slot: int, start: int, end: int) -> torch.Tensor:
        """A view of one slot's cached positions start..end-1, shaped like one
        block of `allocate_kv_blocks`: [layers, 2, kv_heads, end - start, head_dim]."""
        return self._kv_cache[:, slot, :, :, start:end]

    def allocate_kv_blocks(self, count: int, block_size: int) -> torch.Tensor:
        """Zeroed storage for `count` blocks of `block_size` KV positions in the
        cache's dtype, [count, layers, 2, kv_heads, block_size, head_dim]; memory
        becomes resident only as blocks are written (see _lazily_zeroed)."""
        layers, _, pair, heads, _, dim = self._kv_cache.shape
        return _lazily_zeroed((count, layers, pair, heads, block_size, dim), self._kv_dtype)

    def move_slot(self, source: int, target: int, length: int) -> None:
        """Copy the first `length` cached positions of one slot to another."""
        self._kv_cache[:, target, :, :, :length] = self._kv_cache[:, source, :, :, :length]
