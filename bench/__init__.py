"""Benchmark tooling: load generator (loadgen), llama-server anchor, /proc accounting."""
