"""Settings: the one typed configuration object, built once from CLI flags and
QWEN_* environment variables (flags win), then passed down explicitly.

Every field is a flag of `qwen-serve` (`max_tokens_default` -> `--max-tokens-default`)
and an environment variable (`QWEN_MAX_TOKENS_DEFAULT`); `qwen-serve --help` is
generated from the field descriptions below, as is the README's table.
"""

from __future__ import annotations

import argparse
import os
import pathlib
import socket
from typing import Annotated, Any, Literal, get_args, get_origin

from pydantic import Field, model_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

from .engine.config import KvCacheDtype, Quantization

# Name that clients already in the field send in ChatRequest.model.
LEGACY_MODEL_NAME = "Qwen2.5-0.5B-Instruct"
DEFAULT_MODEL_DIRNAME = "Qwen2.5-Coder-0.5B-Instruct"


def default_cache_dir() -> pathlib.Path:
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return pathlib.Path(os.environ.get("QWEN_CACHE_DIR", os.path.join(base, "qwen-grpc")))


def default_model_path() -> str:
    return str(default_cache_dir() / "models" / DEFAULT_MODEL_DIRNAME)


class ConfigError(ValueError):
    """A setting points at something unusable (a missing key file, a bad
    certificate); qwen-serve exits 2 with this message."""


def _split_names(value: Any) -> Any:
    if isinstance(value, str):
        return [name.strip() for name in value.split(",") if name.strip()]
    return value


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="QWEN_", extra="forbid", frozen=True)

    # --- model -------------------------------------------------------------
    model: str = Field(
        default_factory=default_model_path,
        description="Local Hugging Face folder, a .gguf file, or a hub id (default: the folder made by `make model`).",
        json_schema_extra={"doc_default": "`~/.cache/qwen-grpc/models/Qwen2.5-Coder-0.5B-Instruct`"},
    )
    served_model_name: Annotated[list[str], NoDecode] = Field(
        default_factory=list,
        description="Comma-separated names the server answers to; the first is the default "
        f"for an empty ChatRequest.model. Default: the model's own name and {LEGACY_MODEL_NAME}.",
        json_schema_extra={"doc_default": f"model's own name, `{LEGACY_MODEL_NAME}`"},
    )
    dtype: Literal["bfloat16", "float32"] = Field(
        default="bfloat16",
        description="Compute dtype for weights that are not quantized.",
    )
    quantization: Quantization = Field(
        default="auto",
        description="Weight quantization of every Linear incl. the output layer, and of the embedding table: "
        "auto (int5 where the engine's AVX2 kernels run (x86-64, built by `make setup`), else int8; int8-weight-only "
        "instead if a start-up probe finds it clearly faster on this CPU); "
        "int5 (5-bit weights with a scale per 32 inputs, GGUF Q5_0's rounding, int8 activations with one scale per "
        "token; the attention projections and the embedding table int8; batch-invariant; 21 % less memory than int8; "
        "on an AVX2 CPU faster from two rows on, a prefill in ~0.75x the time; perplexity +0.7-1.1 % of bf16; "
        "needs the AVX2 kernels); "
        "int8 (int8 weights per output channel, int8 activations with one scale per token, so a request's output "
        "does not depend on the rest of the batch; perplexity within 3 % of bf16); int8-weight-only (int8 weights, --dtype activations); "
        "int4 (4-bit weights, a scale and a zero per 32 inputs, bf16 activations; batch-invariant too; +6-9 % "
        "perplexity); "
        "none (--dtype weights).",
    )
    weight_cache_dir: str = Field(
        default_factory=lambda: str(default_cache_dir() / "packed"),
        description="Folder for the packed (quantized) weights, written at the first start and read at later ones "
        "(start-up ~3x faster). Empty disables it; an unwritable folder only costs that speed-up.",
        json_schema_extra={"doc_default": "`$QWEN_CACHE_DIR/packed`"},
    )
    kv_cache_dtype: KvCacheDtype = Field(
        default="auto",
        description="KV cache element type: auto = the compute dtype (float32 for int8). bfloat16 halves the cache "
        "(12.3 instead of 24.6 KB per token) at +3 % perplexity on code with int8.",
    )
    threads: int = Field(
        default_factory=lambda: len(os.sched_getaffinity(0)),
        ge=1,
        description="Compute threads for the engine, at most (default: the CPUs this process may use). With the "
        "native int5/int8 kernels the engine runs one thread fewer while busy neighbours keep its threads off "
        "their cores, and probes for it back now and then; on a node where it never gets all of them, setting the "
        "cores it does get saves the probes.",
        json_schema_extra={"doc_default": "CPUs available"},
    )
    # --- engine ------------------------------------------------------------
    max_model_len: int = Field(
        default=4096, ge=16, description="Context window in tokens (prompt + output) per request."
    )
    max_batch_size: int = Field(
        default=16, ge=1, description="Requests decoded together; each holds one KV-cache slot."
    )
    max_waiting: int = Field(
        default=64,
        ge=0,
        description="Requests that may wait for a slot; beyond running + waiting a call gets RESOURCE_EXHAUSTED.",
    )
    prefill_chunk_size: int = Field(
        default=512,
        ge=16,
        description="Most prompt tokens in one forward pass while no stream is decoding (a burst of prompts goes in "
        "together). Larger passes spill the CPU caches: a 990-token prompt took 1.5 s in one pass, 1.2 s in two.",
    )
    interleaved_prefill_tokens: int = Field(
        default=128,
        ge=1,
        description="Most prompt tokens in a forward pass that also advances running streams: bounds their "
        "inter-token latency while newcomers are prefilled (each prompt token adds ~1 ms on 2 cores).",
    )
    prefix_caching: bool = Field(
        default=True,
        description="Reuse the KV cache of prompt prefixes already computed (shared system prompts, earlier "
        "turns of a chat and the model's answers to them); --no-prefix-caching computes every prompt whole.",
    )
    prefix_cache_mb: int = Field(
        default=512,
        ge=1,
        description="Memory for cached prefixes in MiB (float32 KV: 24.6 KB per token, so 512 MiB holds ~21,000 "
        "tokens); least recently used blocks are evicted beyond it. The default keeps a replica with 16 full "
        "slots within the chart's 4 GiB limit (idle ~1.1 GiB + slots up to 1.6 GiB + this).",
    )
    speculative_tokens: int = Field(
        default=4,
        ge=0,
        le=16,
        description="Speculative decoding: most draft tokens per request and forward pass, proposed by prompt "
        "lookup (what followed an earlier occurrence of the text's last few tokens) and kept where the model "
        "agrees; output is unchanged, greedy or sampled. A request's first draft has 2 tokens, the next 2 more "
        "after a draft kept whole, 1 fewer after one cut short; a request whose drafts are wholly rejected drafts "
        "less often (pauses of 1, 2, 4 .. 16 steps). 0 turns it off.",
    )
    speculative_max_batch: int = Field(
        default=4,
        ge=0,
        description="Speculate only in passes with at most this many decoding requests: larger batches are "
        "compute-bound, and their rejected drafts cost more than the accepted ones save.",
    )
    # --- request defaults and limits --------------------------------------
    max_tokens_default: int = Field(default=512, ge=1, description="max_tokens when a request leaves it unset.")
    max_tokens_limit: int = Field(default=2048, ge=1, description="Largest max_tokens a request may ask for.")
    temperature_default: float = Field(default=0.7, ge=0.0, le=2.0, description="Temperature when unset.")
    top_p_default: float = Field(default=0.8, gt=0.0, le=1.0, description="top_p when unset.")
    top_k_default: int = Field(default=20, ge=0, description="top_k when unset (0 disables).")
    repetition_penalty_default: float = Field(
        default=1.05, gt=0.0, le=2.0, description="repetition_penalty when unset (1 disables)."
    )
    max_messages: int = Field(default=256, ge=1, description="Most messages one request may carry.")
    # --- network -----------------------------------------------------------
    host: str = Field(default="0.0.0.0", description="Bind address for every listener.")
    grpc_port: int = Field(default=50051, ge=0, le=65535, description="gRPC port (0 picks a free one).")
    reflection: bool = Field(default=True, description="Serve gRPC server reflection (for grpcurl).")
    metrics_port: int = Field(
        default=9090,
        ge=0,
        le=65535,
        description="Port of the Prometheus /metrics listener, separate from the API (0 disables it).",
    )
    http: bool = Field(
        default=True,
        description="Also serve the OpenAI-compatible HTTP API and the web chat page (--no-http: gRPC only).",
    )
    http_port: int = Field(
        default=8000, ge=0, le=65535, description="HTTP port for the OpenAI-compatible API (0 picks a free one)."
    )
    cors_allowed_origins: Annotated[list[str], NoDecode] = Field(
        default_factory=list,
        description="Comma-separated origins (e.g. `https://app.example.com`, or `*`) whose web pages may call "
        "the HTTP API from a browser (CORS). Default: none, so browsers refuse cross-origin calls.",
        json_schema_extra={"doc_default": "none"},
    )
    drain_timeout: float = Field(
        default=30.0,
        ge=0.0,
        description="Seconds running requests get to finish after SIGTERM before they are cancelled.",
    )
    replica_name: str = Field(
        default_factory=socket.gethostname,
        description="Name sent to clients in the `qwen-replica` response header, so they can tell "
        "which replica served a call (default: the host name, i.e. the pod name on Kubernetes).",
        json_schema_extra={"doc_default": "host name"},
    )
    # --- connection management for client-side load balancing ------------
    # Clients of a headless Service balance per call over the addresses they
    # resolved, but gRPC re-resolves DNS only when a connection closes. A
    # bounded connection age makes every client reconnect (and re-resolve)
    # regularly, so replicas added by a scale-up get traffic. The defaults
    # are explained in clients/python/README.md ("Server settings").
    max_connection_age: float = Field(
        default=60.0,
        ge=0.0,
        description="Seconds after which the server asks a client connection to close (GOAWAY, with up to "
        "10 percent random jitter), so clients re-resolve DNS and find new replicas. 0 = never.",
    )
    max_connection_age_grace: float = Field(
        default=600.0,
        ge=0.0,
        description="Seconds calls still running on an aged connection may take before it is closed hard. "
        "Must exceed the longest allowed stream (max-tokens-limit at the slowest token rate under "
        "full load), or long streams are cut.",
    )
    keepalive_time: float = Field(
        default=60.0,
        gt=0.0,
        description="Seconds between the server's own keepalive pings, so generations for dead clients "
        "are cancelled instead of occupying a slot.",
    )
    keepalive_timeout: float = Field(
        default=20.0,
        gt=0.0,
        description="Seconds the server waits for a keepalive ping ack before it closes the connection.",
    )
    keepalive_min_ping_interval: float = Field(
        default=10.0,
        ge=0.0,
        description="Shortest interval between client pings the server accepts; faster pings are answered "
        "with GOAWAY too_many_pings. The client SDKs ping every 30 s by default.",
    )
    keepalive_permit_without_calls: bool = Field(
        default=True,
        description="Accept client keepalive pings on connections with no running call (the SDKs send "
        "them so an idle channel notices a dead replica before the next call).",
    )
    log_level: Literal["debug", "info", "warning", "error"] = Field(default="info", description="Log level.")
    port_file: str | None = Field(
        default=None,
        description='Write the bound ports as JSON (`{"grpc": P, "http": P, "metrics": P}`, null for a listener '
        "that is off) to this file once every listener is bound, before the model loads: for ports picked "
        "with 0 (tests, scripts).",
    )
    # --- limits and security (see SECURITY.md) -----------------------------
    max_request_bytes: int = Field(
        default=1024 * 1024,
        ge=1024,
        description="Largest request accepted (a gRPC message, an HTTP body); larger ones get "
        "RESOURCE_EXHAUSTED (gRPC) / 413 (HTTP) before they are parsed.",
    )
    max_tokenizer_queue_bytes: int = Field(
        default=2 * 1024 * 1024,
        ge=1024,
        description="Prompt bytes that may wait for or be in the tokenizer at once (one thread, ~1 s per MiB); "
        "a request that would go beyond gets RESOURCE_EXHAUSTED / 429 at once instead of queueing behind them.",
    )
    max_buffered_tokens: int = Field(
        default=256,
        ge=1,
        description="Tokens generated for a stream that its client has not taken yet; a client that falls this "
        "far behind (not reading) has its generation ended (finish reason slow_consumer), freeing its slot.",
    )
    http_max_connections: int = Field(
        default=1000,
        ge=1,
        description="Open HTTP connections; beyond it new ones are closed at once, so the process keeps file "
        "descriptors for gRPC (also capped at half the file-descriptor limit).",
    )
    http_header_timeout: float = Field(
        default=10.0,
        gt=0.0,
        description="Seconds a new HTTP connection, or the next request on a kept-alive one once its first "
        "byte arrived, has to send the complete request headers; slower (silent, slowloris) ones are closed.",
    )
    http_body_timeout: float = Field(
        default=30.0,
        gt=0.0,
        description="Seconds an HTTP request body may take from the end of its headers; a client that stops "
        "mid-body is disconnected.",
    )
    http_keepalive_timeout: float = Field(
        default=5.0,
        gt=0.0,
        description="Seconds an idle HTTP keep-alive connection stays open after a response.",
    )
    http_write_timeout: float = Field(
        default=60.0,
        gt=0.0,
        description="Seconds an HTTP response may stay blocked because the client does not read it "
        "(the send buffer stays full); then the connection is closed and its request cancelled.",
    )
    allowed_hosts: Annotated[list[str], NoDecode] = Field(
        default_factory=list,
        json_schema_extra={"doc_default": "any"},
        description="Comma-separated host names the HTTP API answers to (the Host header, port ignored); other "
        "hosts get 400. Guards a keyless replica against DNS rebinding from browsers. Empty: any host.",
    )
    rate_limit_per_second: float = Field(
        default=0.0,
        ge=0.0,
        description="Per-client request rate (token bucket), keyed by API key when keys are set, else by "
        "peer address; over it a call gets RESOURCE_EXHAUSTED / 429 with a retry hint. 0 disables.",
    )
    rate_limit_burst: int = Field(
        default=20, ge=1, description="Requests a client may send at once before rate_limit_per_second applies."
    )
    api_keys: Annotated[list[str], NoDecode] = Field(
        default_factory=list,
        repr=False,
        json_schema_extra={"doc_default": "none"},
        description="Comma-separated API keys accepted as `authorization: Bearer <key>`; any key set "
        "(here or in api_keys_file) turns authentication on. Prefer the env var or the file: "
        "command lines are visible to every local user.",
    )
    api_keys_file: str | None = Field(
        default=None,
        description="File with one API key per line (blank lines and # comments ignored), "
        "e.g. a mounted Kubernetes Secret; read once at start.",
    )
    auth_public_health: bool = Field(
        default=True, description="With API keys on, grpc.health.v1 stays callable without a key (for probes)."
    )
    auth_public_reflection: bool = Field(
        default=False, description="With API keys on, server reflection stays callable without a key."
    )
    tls_cert_file: str | None = Field(
        default=None, description="PEM certificate chain: serve gRPC over TLS (needs tls_key_file)."
    )
    tls_key_file: str | None = Field(default=None, description="PEM private key for tls_cert_file.")
    tls_client_ca_file: str | None = Field(
        default=None,
        description="PEM CA bundle: require every client to present a certificate signed by it (mutual TLS).",
    )

    @model_validator(mode="before")
    @classmethod
    def _names_from_csv(cls, data: Any) -> Any:
        if isinstance(data, dict):
            for name in ("served_model_name", "api_keys", "allowed_hosts", "cors_allowed_origins"):
                if name in data:
                    data = {**data, name: _split_names(data[name])}
        return data

    @model_validator(mode="after")
    def _check_limits(self) -> Settings:
        if self.max_tokens_default > self.max_tokens_limit:
            raise ValueError("max_tokens_default must not exceed max_tokens_limit")
        if self.max_tokens_limit >= self.max_model_len:
            raise ValueError("max_tokens_limit must be below max_model_len")
        if bool(self.tls_cert_file) != bool(self.tls_key_file):
            raise ValueError("tls_cert_file and tls_key_file must be set together")
        if self.tls_client_ca_file and not self.tls_cert_file:
            raise ValueError("tls_client_ca_file (mutual TLS) needs tls_cert_file and tls_key_file")
        return self

    @property
    def auth_enabled(self) -> bool:
        return bool(self.api_keys or self.api_keys_file)


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def build_parser(prog: str = "qwen-serve") -> argparse.ArgumentParser:
    """An argparse parser with one flag per Settings field; unset flags stay absent
    so that environment variables and defaults apply."""
    parser = argparse.ArgumentParser(
        prog=prog,
        description="Serve a Qwen2.5 chat model over gRPC and OpenAI-compatible HTTP. Every flag is also an env var QWEN_<FLAG>.",
        argument_default=argparse.SUPPRESS,
    )
    for name, field in Settings.model_fields.items():
        env = f"QWEN_{name.upper()}"
        default = field.get_default(call_default_factory=True)
        help_text = f"{field.description} [env {env}; default {default!r}]".replace("%", "%%")
        annotation = field.annotation
        if annotation is bool:
            parser.add_argument(_flag(name), action=argparse.BooleanOptionalAction, help=help_text)
        elif get_origin(annotation) is Literal:
            parser.add_argument(_flag(name), choices=get_args(annotation), help=help_text)
        else:
            parser.add_argument(_flag(name), help=help_text, metavar=name.upper())
    return parser


def load_settings(argv: list[str] | None = None) -> Settings:
    """Flags override QWEN_* env vars, which override defaults."""
    args = build_parser().parse_args(argv)
    return Settings(**vars(args))


def settings_table() -> str:
    """The README's configuration table, generated from the fields."""
    rows = ["| flag | env | default | meaning |", "|---|---|---|---|"]
    for name, field in Settings.model_fields.items():
        extra = field.json_schema_extra if isinstance(field.json_schema_extra, dict) else {}
        default = extra.get("doc_default") or f"`{field.default}`"
        rows.append(f"| `{_flag(name)}` | `QWEN_{name.upper()}` | {default} | {field.description} |")
    return "\n".join(rows)


if __name__ == "__main__":
    print(settings_table())
