"""The forward pass of a Qwen2 model over a slot-based KV cache.

The cache is preallocated: one slot per concurrently decoded request, each
`max_model_len` positions long. Decoding requests always occupy slots
0..B-1 (the scheduler keeps them compact), so a decode step attends over a
view of the cache, never a gather. The transformer blocks' own modules
(projections, norms, MLPs) do the math, so quantized Linear replacements work
unchanged; only attention and the cache are ours.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .loader import LoadedModel


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


class ModelRunner:
    def __init__(self, loaded: LoadedModel, num_slots: int, max_model_len: int) -> None:
        model = loaded.model
        config = model.config
        self.vocab_size = config.vocab_size
        self.num_slots = num_slots
        self.max_model_len = max_model_len
        self._embed = model.model.embed_tokens
        self._layers = list(model.model.layers)
        self._norm = model.model.norm
        self._lm_head = model.lm_head
        self._num_heads = config.num_attention_heads
        self._num_kv_heads = config.num_key_value_heads
        self._head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
        self.dtype = loaded.dtype
        shape = (len(self._layers), num_slots, self._num_kv_heads, max_model_len, self._head_dim)
        # Zero-filled: masked positions are still read by attention, and
        # uninitialised memory could hold NaN, which a mask cannot cancel.
        self._k_cache = torch.zeros(shape, dtype=self.dtype)
        self._v_cache = torch.zeros(shape, dtype=self.dtype)
        with torch.inference_mode():
            positions = torch.arange(max_model_len).unsqueeze(0)
            probe = torch.zeros(1, dtype=self.dtype)
            cos, sin = model.model.rotary_emb(probe, positions)
        self._cos = cos[0].to(self.dtype)  # [max_model_len, head_dim]
        self._sin = sin[0].to(self.dtype)
        self._positions = torch.arange(max_model_len)

    @property
    def kv_bytes(self) -> int:
        return 2 * self._k_cache.numel() * self._k_cache.element_size()

    def _rope(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        return x * cos + _rotate_half(x) * sin

    def _project_qkv(self, layer, hidden: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor):
        batch, steps, _ = hidden.shape
        attn = layer.self_attn
        q = attn.q_proj(hidden).view(batch, steps, self._num_heads, self._head_dim).transpose(1, 2)
        k = attn.k_proj(hidden).view(batch, steps, self._num_kv_heads, self._head_dim).transpose(1, 2)
        v = attn.v_proj(hidden).view(batch, steps, self._num_kv_heads, self._head_dim).transpose(1, 2)
        return self._rope(q, cos, sin), self._rope(k, cos, sin), v

    def _finish_layer(self, layer, residual: torch.Tensor, attn_out: torch.Tensor) -> torch.Tensor:
        batch, _, steps, _ = attn_out.shape
        attn_out = attn_out.transpose(1, 2).reshape(batch, steps, self._num_heads * self._head_dim)
        hidden = residual + layer.self_attn.o_proj(attn_out)
        return hidden + layer.mlp(layer.post_attention_layernorm(hidden))

    def _logits(self, hidden_last: torch.Tensor) -> torch.Tensor:
        return self._lm_head(self._norm(hidden_last)).float()

    @torch.inference_mode()
    def prefill(self, slot: int, token_ids: list[int], start: int) -> torch.Tensor:
        """Run prompt tokens at positions start.. into `slot`; return the logits
        (float32, [vocab]) for the position after the last one."""
        steps = len(token_ids)
        end = start + steps
        ids = torch.tensor(token_ids, dtype=torch.long).unsqueeze(0)
        hidden = self._embed(ids).to(self.dtype)
        cos = self._cos[start:end].view(1, 1, steps, -1)
        sin = self._sin[start:end].view(1, 1, steps, -1)
        # Query i (absolute position start+i) sees keys 0..start+i.
        mask = None if start == 0 else self._positions[:end].unsqueeze(0) <= self._positions[start:end].unsqueeze(1)
        for index, layer in enumerate(self._layers):
            q, k, v = self._project_qkv(layer, layer.input_layernorm(hidden), cos, sin)
            self._k_cache[index, slot, :, start:end] = k[0]
            self._v_cache[index, slot, :, start:end] = v[0]
            keys = self._k_cache[index, slot : slot + 1, :, :end]
            values = self._v_cache[index, slot : slot + 1, :, :end]
            out = F.scaled_dot_product_attention(
                q, keys, values, attn_mask=mask, is_causal=mask is None, enable_gqa=True
            )
            hidden = self._finish_layer(layer, hidden, out)
        return self._logits(hidden[:, -1])[0]

    @torch.inference_mode()
    def decode(self, token_ids: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """One token for each of the B requests in slots 0..B-1.
        token_ids, positions: long [B]. Returns float32 logits [B, vocab]."""
        batch = token_ids.shape[0]
        hidden = self._embed(token_ids.unsqueeze(1)).to(self.dtype)
        cos = self._cos[positions].view(batch, 1, 1, -1)
        sin = self._sin[positions].view(batch, 1, 1, -1)
        span = int(positions.max()) + 1
        mask = (self._positions[:span].unsqueeze(0) <= positions.unsqueeze(1)).view(batch, 1, 1, span)
        slots = self._positions[:batch]
        for index, layer in enumerate(self._layers):
            q, k, v = self._project_qkv(layer, layer.input_layernorm(hidden), cos, sin)
            self._k_cache[index, slots, :, positions] = k[:, :, 0]
            self._v_cache[index, slots, :, positions] = v[:, :, 0]
            keys = self._k_cache[index, :batch, :, :span]
            values = self._v_cache[index, :batch, :, :span]
            out = F.scaled_dot_product_attention(q, keys, values, attn_mask=mask, enable_gqa=True)
            hidden = self._finish_layer(layer, hidden, out)
        return self._logits(hidden[:, -1])

    def move_slot(self, source: int, target: int, length: int) -> None:
        """Copy the first `length` cached positions of one slot to another."""
        self._k_cache[:, target, :, :length] = self._k_cache[:, source, :, :length]
        self._v_cache[:, target, :, :length] = self._v_cache[:, source, :, :length]
