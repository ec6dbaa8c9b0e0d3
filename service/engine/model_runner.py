"""The forward pass of a Qwen2 model over a slot-based KV cache.

The cache is preallocated: one slot per concurrently decoded request, each
`max_model_len` positions long. Decoding requests always occupy slots
0..B-1 (the scheduler keeps them compact), so a decode step attends over a
view of the cache, never a gather.

The runner repacks the transformer's weights once: q/k/v become one Linear
and gate/up another, so a step makes 4 matrix products per layer instead of
7 (for int8, 4 activation quantizations instead of 7). The norms are the
model's own modules.
"""

from __future__ import annotations

import dataclasses
import math
import mmap
import warnings

import torch
import torch.nn.functional as F
from torch import nn

from .loader import LoadedModel

QUANTIZATIONS = ("none", "int8", "int8-weight-only")


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def _fuse(*linears: nn.Linear) -> nn.Linear:
    """One Linear whose output is the concatenation of the given ones'."""
    weight = torch.cat([lin.weight.data for lin in linears], dim=0)
    has_bias = linears[0].bias is not None
    fused = nn.Linear(weight.shape[1], weight.shape[0], bias=has_bias, dtype=weight.dtype)
    fused.weight.data = weight
    if has_bias:
        fused.bias.data = torch.cat([lin.bias.data for lin in linears], dim=0)
    return fused


class Int8WeightOnlyLinear(nn.Module):
    """int8 weights with one scale per output channel; activations keep their
    dtype. Half the weight bytes of bf16 (decode is bound by reading weights)
    with almost no accuracy cost, since activations are not quantized."""

    # The CPU kernel is fast with bf16 activations and slow with float32 ones,
    # so float32 callers are served through bf16.
    compute_dtype = torch.bfloat16

    def __init__(self, linear: nn.Linear) -> None:
        super().__init__()
        weight = linear.weight.data.float()
        scale = weight.abs().amax(dim=1).clamp(min=1e-8) / 127.0
        self.weight = torch.round(weight / scale[:, None]).clamp(-127, 127).to(torch.int8).contiguous()
        self.scale = scale.to(self.compute_dtype)
        self.bias = None if linear.bias is None else linear.bias.data.to(self.compute_dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        flat = x.reshape(-1, x.shape[-1]).to(self.compute_dtype)
        out = torch._weight_int8pack_mm(flat, self.weight, self.scale)
        if self.bias is not None:
            out = out + self.bias
        return out.to(x.dtype).view(*x.shape[:-1], out.shape[-1])


def _owned(module: nn.Module) -> nn.Module:
    """Give the module's tensors their own memory. The loader may hand out
    tensors backed by the memory-mapped weights file; once none is left, that
    mapping goes and resident memory is the repacked weights only."""
    for parameter in module.parameters():
        parameter.data = parameter.data.clone()
    return module


def _quantize_int8_dynamic(linear: nn.Linear) -> nn.Module:
    """Dynamic int8 (torch.ao, fbgemm): int8 weights per output channel,
    activations quantized per step, int8 matrix products, float32 in and out.
    The fastest path here, batched or not. One Linear at a time keeps the
    peak memory low."""
    holder = nn.Sequential(linear.float())
    with warnings.catch_warnings():
        # torch.ao quantization is deprecated in favour of torchao; it still works in torch 2.13.
        warnings.simplefilter("ignore", (UserWarning, DeprecationWarning))
        from torch.ao.quantization import per_channel_dynamic_qconfig, quantize_dynamic

        quantize_dynamic(holder, {nn.Linear: per_channel_dynamic_qconfig}, inplace=True)
    return holder[0]


def _lazily_zeroed(shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
    """A zero tensor backed by an anonymous memory mapping: the kernel hands out
    zero pages on first touch, so resident memory follows the KV positions
    actually written, not the configured maximum. Zero matters: attention
    also reads masked positions, and uninitialised memory could hold NaN,
    which no mask cancels (0 * NaN is NaN)."""
    nbytes = math.prod(shape) * torch.empty((), dtype=dtype).element_size()
    mapping = mmap.mmap(-1, nbytes, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    return torch.frombuffer(mapping, dtype=dtype).view(shape)


@dataclasses.dataclass
class _Block:
    input_norm: nn.Module
    qkv: nn.Module
    o_proj: nn.Module
    post_norm: nn.Module
    gate_up: nn.Module
    down: nn.Module


class ModelRunner:
    def __init__(self, loaded: LoadedModel, num_slots: int, max_model_len: int, quantization: str = "none") -> None:
        if quantization not in QUANTIZATIONS:
            raise ValueError(f"unknown quantization {quantization!r}; choose from {QUANTIZATIONS}")
        model = loaded.model
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
        # Dynamic int8 computes in float32; everything else in the loaded dtype.
        self.dtype = torch.float32 if quantization == "int8" else loaded.dtype
        pack = {
            "none": _owned,
            "int8": _quantize_int8_dynamic,
            "int8-weight-only": Int8WeightOnlyLinear,
        }[quantization]
        # down_proj sees Qwen's activation outliers: quantizing its input per
        # step raised perplexity by 60 %; weight-only int8 there keeps it within 1 % of bf16.
        pack_down = Int8WeightOnlyLinear if quantization == "int8" else pack

        self._embed = model.model.embed_tokens  # a lookup: stays in the loaded dtype
        self._norm = model.model.norm.to(self.dtype)
        self._blocks = []
        for layer in model.model.layers:
            attn, mlp = layer.self_attn, layer.mlp
            self._blocks.append(
                _Block(
                    input_norm=layer.input_layernorm.to(self.dtype),
                    qkv=pack(_fuse(attn.q_proj, attn.k_proj, attn.v_proj)),
                    o_proj=pack(attn.o_proj),
                    post_norm=layer.post_attention_layernorm.to(self.dtype),
                    gate_up=pack(_fuse(mlp.gate_proj, mlp.up_proj)),
                    down=pack_down(mlp.down_proj),
                )
            )
            # Drop the originals as we go so peak memory stays near one copy.
            layer.self_attn = layer.mlp = None
        lm_head = model.lm_head
        if lm_head.weight is self._embed.weight:  # tied: the head needs its own copy to be packed
            lm_head = nn.Linear(lm_head.in_features, lm_head.out_features, bias=False, dtype=lm_head.weight.dtype)
            lm_head.weight.data = self._embed.weight.data.clone()
        self._lm_head = pack(lm_head)
        model.lm_head = None
        for module in (self._embed, self._norm, *(m for b in self._blocks for m in (b.input_norm, b.post_norm))):
            _owned(module)

        q_size = self._num_heads * self._head_dim
        kv_size = self._num_kv_heads * self._head_dim
        self._qkv_split = (q_size, kv_size, kv_size)
        shape = (len(self._blocks), num_slots, self._num_kv_heads, max_model_len, self._head_dim)
        self._k_cache = _lazily_zeroed(shape, self.dtype)
        self._v_cache = _lazily_zeroed(shape, self.dtype)
        with torch.inference_mode():
            positions = torch.arange(max_model_len).unsqueeze(0)
            probe = torch.zeros(1, dtype=self.dtype)
            cos, sin = model.model.rotary_emb(probe, positions)
        self._cos = cos[0].to(self.dtype)  # [max_model_len, head_dim]
        self._sin = sin[0].to(self.dtype)
        self._positions = torch.arange(max_model_len)

    @property
    def kv_bytes_per_token(self) -> int:
        return 2 * len(self._blocks) * self._num_kv_heads * self._head_dim * self._k_cache.element_size()

    def _rope(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        return x * cos + _rotate_half(x) * sin

    def _project_qkv(self, block: _Block, hidden: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor):
        batch, steps, _ = hidden.shape
        q, k, v = block.qkv(block.input_norm(hidden)).split(self._qkv_split, dim=-1)
        q = q.view(batch, steps, self._num_heads, self._head_dim).transpose(1, 2)
        k = k.view(batch, steps, self._num_kv_heads, self._head_dim).transpose(1, 2)
        v = v.view(batch, steps, self._num_kv_heads, self._head_dim).transpose(1, 2)
        return self._rope(q, cos, sin), self._rope(k, cos, sin), v

    def _finish_block(self, block: _Block, residual: torch.Tensor, attn_out: torch.Tensor) -> torch.Tensor:
        batch, _, steps, _ = attn_out.shape
        attn_out = attn_out.transpose(1, 2).reshape(batch, steps, self._num_heads * self._head_dim)
        hidden = residual + block.o_proj(attn_out)
        gate, up = block.gate_up(block.post_norm(hidden)).split(self._intermediate, dim=-1)
        return hidden + block.down(F.silu(gate) * up)

    def _embed_tokens(self, ids: torch.Tensor) -> torch.Tensor:
        return self._embed(ids).to(self.dtype)

    def _logits(self, hidden_last: torch.Tensor) -> torch.Tensor:
        return self._lm_head(self._norm(hidden_last)).float()

    @torch.inference_mode()
    def prefill(self, slot: int, token_ids: list[int], start: int, all_logits: bool = False) -> torch.Tensor:
        """Run prompt tokens at positions start.. into `slot`; return the logits
        (float32, [vocab]) for the position after the last one, or with
        all_logits those after every token ([steps, vocab], for scoring text)."""
        steps = len(token_ids)
        end = start + steps
        hidden = self._embed_tokens(torch.tensor(token_ids, dtype=torch.long).unsqueeze(0))
        cos = self._cos[start:end].view(1, 1, steps, -1)
        sin = self._sin[start:end].view(1, 1, steps, -1)
        # Query i (absolute position start+i) sees keys 0..start+i.
        mask = None if start == 0 else self._positions[:end].unsqueeze(0) <= self._positions[start:end].unsqueeze(1)
        for index, block in enumerate(self._blocks):
            q, k, v = self._project_qkv(block, hidden, cos, sin)
            self._k_cache[index, slot, :, start:end] = k[0]
            self._v_cache[index, slot, :, start:end] = v[0]
            keys = self._k_cache[index, slot : slot + 1, :, :end]
            values = self._v_cache[index, slot : slot + 1, :, :end]
            out = F.scaled_dot_product_attention(
                q, keys, values, attn_mask=mask, is_causal=mask is None, enable_gqa=True
            )
            hidden = self._finish_block(block, hidden, out)
        return self._logits(hidden[0]) if all_logits else self._logits(hidden[:, -1])[0]

    @torch.inference_mode()
    def decode(self, token_ids: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """One token for each of the B requests in slots 0..B-1.
        token_ids, positions: long [B]. Returns float32 logits [B, vocab]."""
        batch = token_ids.shape[0]
        hidden = self._embed_tokens(token_ids.unsqueeze(1))
        cos = self._cos[positions].view(batch, 1, 1, -1)
        sin = self._sin[positions].view(batch, 1, 1, -1)
        span = int(positions.max()) + 1
        mask = (self._positions[:span].unsqueeze(0) <= positions.unsqueeze(1)).view(batch, 1, 1, span)
        slots = self._positions[:batch]
        for index, block in enumerate(self._blocks):
            q, k, v = self._project_qkv(block, hidden, cos, sin)
            self._k_cache[index, slots, :, positions] = k[:, :, 0]
            self._v_cache[index, slots, :, positions] = v[:, :, 0]
            keys = self._k_cache[index, :batch, :, :span]
            values = self._v_cache[index, :batch, :, :span]
            out = F.scaled_dot_product_attention(q, keys, values, attn_mask=mask, enable_gqa=True)
            hidden = self._finish_block(block, hidden, out)
        return self._logits(hidden[:, -1])

    def move_slot(self, source: int, target: int, length: int) -> None:
        """Copy the first `length` cached positions of one slot to another."""
        self._k_cache[:, target, :, :length] = self._k_cache[:, source, :, :length]
        self._v_cache[:, target, :, :length] = self._v_cache[:, source, :, :length]
