"""EngineConfig: what the engine, its scheduler and its model runner are
configured with, built once from Settings (where the defaults, ranges and
descriptions live) and passed down whole.

Torch-free, so that service.config can take the quantization and KV-cache
choices from here without loading the engine."""

from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING, Any, Literal, get_args

if TYPE_CHECKING:
    from ..config import Settings

Quantization = Literal["auto", "int8", "int5", "int8-weight-only", "int4", "none"]
KvCacheDtype = Literal["auto", "float32", "bfloat16"]
QUANTIZATIONS: tuple[str, ...] = get_args(Quantization)
KV_CACHE_DTYPES: tuple[str, ...] = get_args(KvCacheDtype)


@dataclasses.dataclass(frozen=True)
class EngineConfig:
    """The meaning of each field is the description of the Settings field of
    the same name; prefix_cache_bytes is 0 without a prefix cache."""

    max_batch_size: int  # also the KV-cache slots of the model runner
    max_waiting: int
    max_model_len: int
    prefill_chunk_size: int
    interleaved_prefill_tokens: int
    threads: int
    quantization: str
    kv_cache_dtype: str
    max_buffered_tokens: int
    prefix_cache_bytes: int
    speculative_tokens: int
    speculative_max_batch: int

    def __post_init__(self) -> None:
        if self.quantization not in QUANTIZATIONS:
            raise ValueError(f"unknown quantization {self.quantization!r}; choose from {QUANTIZATIONS}")
        if self.kv_cache_dtype not in KV_CACHE_DTYPES:
            raise ValueError(f"unknown KV cache dtype {self.kv_cache_dtype!r}; choose from {KV_CACHE_DTYPES}")

    @classmethod
    def from_settings(cls, settings: Settings) -> EngineConfig:
        return cls(
            max_batch_size=settings.max_batch_size,
            max_waiting=settings.max_waiting,
            max_model_len=settings.max_model_len,
            prefill_chunk_size=settings.prefill_chunk_size,
            interleaved_prefill_tokens=settings.interleaved_prefill_tokens,
            threads=settings.threads,
            quantization=settings.quantization,
            kv_cache_dtype=settings.kv_cache_dtype,
            max_buffered_tokens=settings.max_buffered_tokens,
            prefix_cache_bytes=settings.prefix_cache_mb << 20 if settings.prefix_caching else 0,
            speculative_tokens=settings.speculative_tokens,
            speculative_max_batch=settings.speculative_max_batch,
        )

    @classmethod
    def defaults(cls, **overrides: Any) -> EngineConfig:
        """The server's defaults (Settings' own, not the environment's) with
        `overrides`: for tests, benchmarks and tools that run an engine."""
        from ..config import Settings

        return dataclasses.replace(cls.from_settings(Settings.model_construct()), **overrides)
