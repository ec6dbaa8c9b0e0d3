"""Metrics whose values the service layer sets (not derived from traffic)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, generate_latest

from service.engine.types import EngineSetup, EngineStats
from service.observability.metrics import Metrics

IDLE = EngineStats(running=0, waiting=0, kv_cache_used_tokens=0, kv_cache_capacity_tokens=64, generated_tokens_total=0)


def _exposition(setup: EngineSetup) -> str:
    metrics = Metrics(CollectorRegistry())
    metrics.for_model("qwen").track_engine(setup, lambda: IDLE, max_running=4, max_waiting=8)
    return generate_latest(metrics.registry).decode()


def test_engine_info_says_which_path_the_replica_runs():
    fast = _exposition(EngineSetup("int5", "auto", native_layers=True, kv_cache_dtype="float32", kernels="avx512-vnni"))
    assert (
        'qwen_engine_info{kernels="avx512-vnni",kv_cache_dtype="float32",model="qwen",native_layers="true",'
        'quantization="int5",requested_quantization="auto"} 1.0'
    ) in fast
    slow = _exposition(
        EngineSetup("int8-weight-only", "auto", native_layers=False, kv_cache_dtype="bfloat16", kernels="torch")
    )
    assert 'native_layers="false",quantization="int8-weight-only",requested_quantization="auto"} 1.0' in slow
    assert 'kernels="torch",kv_cache_dtype="bfloat16"' in slow
