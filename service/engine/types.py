"""Engine-facing types. Nothing here knows about gRPC, HTTP or torch."""

from __future__ import annotations

import dataclasses
import enum
import math
from typing import TYPE_CHECKING, Protocol

if TYPE_CHECKING:
    from .grammar import Grammar


class FinishReason(enum.StrEnum):
    """Values are OpenAI's finish_reason strings, names the proto's
    FINISH_REASON_* (the transports derive theirs from these). ERROR and
    SLOW_CONSUMER never reach a client as a finish reason: ChatService
    turns them into errors."""

    STOP = "stop"  # end-of-sequence token or a stop string
    LENGTH = "length"  # max_tokens reached or the context window is full
    CANCELLED = "cancelled"  # aborted (client cancel, deadline, shutdown)
    ERROR = "error"  # the engine failed this request
    # Ended because its consumer fell max_buffered_tokens behind (a client
    # not reading its stream): the slot is freed instead of generating
    # max_tokens into a buffer nobody drains.
    SLOW_CONSUMER = "slow_consumer"


class ConstraintKind(enum.StrEnum):
    JSON_SCHEMA = "json_schema"  # a JSON Schema as JSON text
    LARK = "lark"  # a Lark grammar (llguidance's dialect; may embed JSON Schemas)


@dataclasses.dataclass(frozen=True)
class OutputConstraint:
    """The answer must match this grammar (constrained decoding)."""

    kind: ConstraintKind
    source: str


# The valid range of every sampling setting, written once: SamplingParams
# enforces them, the service layer names them in its messages.
TEMPERATURE_MAX = 2.0  # temperature in [0, TEMPERATURE_MAX]; 0 = greedy
REPETITION_PENALTY_MAX = 2.0  # repetition_penalty in (0, REPETITION_PENALTY_MAX]
PENALTY_LIMIT = 2.0  # presence_penalty and frequency_penalty in [-PENALTY_LIMIT, PENALTY_LIMIT] (OpenAI's range)
LOGIT_BIAS_LIMIT = 100.0  # a logit_bias value in [-LOGIT_BIAS_LIMIT, LOGIT_BIAS_LIMIT] (OpenAI's range)
MAX_LOGIT_BIAS_ENTRIES = 300  # as OpenAI
MAX_TOP_LOGPROBS = 20  # top_logprobs in [0, MAX_TOP_LOGPROBS] (OpenAI's range)
MAX_N = 8  # choices per request, n in [1, MAX_N] (and at most --max-batch-size: each takes a slot)
MAX_STOP_SEQUENCES = 16
MAX_STOP_BYTES = 256
INT64_MIN, INT64_MAX = -(2**63), 2**63 - 1
# A logprob of a token the distribution excludes (-inf: masked by a grammar,
# cut by logit_bias) is reported as this, as OpenAI does: JSON has no -inf.
LOGPROB_FLOOR = -9999.0


class InvalidSamplingParams(ValueError):
    """A sampling setting is out of its range; `field` names it."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(f"{field}: {message}")
        self.field = field
        self.message = message


def _integer(field: str, value: object, low: int, high: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int):
        raise InvalidSamplingParams(field, f"must be an integer, got {value!r}")
    if not low <= value <= high:
        raise InvalidSamplingParams(field, f"must be between {low} and {high}, got {value}")


def _number(field: str, value: object) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise InvalidSamplingParams(field, f"must be a number, got {value!r}")
    if not math.isfinite(value):
        raise InvalidSamplingParams(field, f"must be a finite number, got {value}")
    return float(value)


@dataclasses.dataclass(frozen=True)
class SamplingParams:
    """Fully resolved sampling settings (server defaults already applied).
    Validates its own invariants, so no transport can build an invalid one
    (InvalidSamplingParams names the field); limits that depend on the
    server (max_tokens' upper bound, logit_bias ids against the vocabulary,
    n against the batch size) are the service layer's."""

    max_tokens: int
    temperature: float = 0.0  # 0 = greedy
    top_p: float = 1.0
    top_k: int = 0  # 0 = off
    repetition_penalty: float = 1.0  # 1 = off
    seed: int | None = None
    stop: tuple[str, ...] = ()
    # Choices generated from one prefill of the prompt; choice i draws from
    # the seed stream seed + i (mod 2^64).
    n: int = 1
    logprobs: bool = False  # report each generated token's logprob
    top_logprobs: int = 0  # and this many most likely alternatives (needs logprobs)
    # OpenAI's penalties over the generated tokens: logit -= frequency * count + presence * (count > 0).
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    logit_bias: tuple[tuple[int, float], ...] = ()  # (token id, added to its logit), ids distinct

    def __post_init__(self) -> None:
        _integer("max_tokens", self.max_tokens, 1, INT64_MAX)
        if not 0.0 <= _number("temperature", self.temperature) <= TEMPERATURE_MAX:
            raise InvalidSamplingParams(
                "temperature", f"must be between 0 and {TEMPERATURE_MAX}, got {self.temperature}"
            )
        if not 0.0 < _number("top_p", self.top_p) <= 1.0:
            raise InvalidSamplingParams("top_p", f"must be in (0, 1], got {self.top_p}")
        if isinstance(self.top_k, bool) or not isinstance(self.top_k, int) or self.top_k < 0:
            raise InvalidSamplingParams("top_k", f"must be an integer >= 0 (0 disables), got {self.top_k!r}")
        if not 0.0 < _number("repetition_penalty", self.repetition_penalty) <= REPETITION_PENALTY_MAX:
            raise InvalidSamplingParams(
                "repetition_penalty", f"must be in (0, {REPETITION_PENALTY_MAX}], got {self.repetition_penalty}"
            )
        if self.seed is not None:
            # As OpenAI: a seed is an int64 (a wider one would wrap onto another seed's text).
            _integer("seed", self.seed, INT64_MIN, INT64_MAX)
        if not isinstance(self.stop, tuple):
            raise InvalidSamplingParams("stop", f"must be a tuple of strings, got {self.stop!r}")
        if len(self.stop) > MAX_STOP_SEQUENCES:
            raise InvalidSamplingParams("stop", f"at most {MAX_STOP_SEQUENCES} sequences, got {len(self.stop)}")
        for index, stop in enumerate(self.stop):
            if not isinstance(stop, str) or not stop or len(stop.encode("utf-8", "surrogatepass")) > MAX_STOP_BYTES:
                raise InvalidSamplingParams(f"stop[{index}]", f"must be 1..{MAX_STOP_BYTES} bytes")
        _integer("n", self.n, 1, MAX_N)
        if not isinstance(self.logprobs, bool):
            raise InvalidSamplingParams("logprobs", f"must be a boolean, got {self.logprobs!r}")
        _integer("top_logprobs", self.top_logprobs, 0, MAX_TOP_LOGPROBS)
        if self.top_logprobs and not self.logprobs:
            raise InvalidSamplingParams("top_logprobs", "requires logprobs to be true")
        for field in ("presence_penalty", "frequency_penalty"):
            value = getattr(self, field)
            if not -PENALTY_LIMIT <= _number(field, value) <= PENALTY_LIMIT:
                raise InvalidSamplingParams(field, f"must be between {-PENALTY_LIMIT} and {PENALTY_LIMIT}, got {value}")
        if not isinstance(self.logit_bias, tuple):
            raise InvalidSamplingParams("logit_bias", f"must be a tuple of (token id, bias), got {self.logit_bias!r}")
        if len(self.logit_bias) > MAX_LOGIT_BIAS_ENTRIES:
            raise InvalidSamplingParams(
                "logit_bias", f"at most {MAX_LOGIT_BIAS_ENTRIES} entries, got {len(self.logit_bias)}"
            )
        for token, bias in self.logit_bias:
            _integer("logit_bias", token, 0, INT64_MAX)
            if not -LOGIT_BIAS_LIMIT <= _number("logit_bias", bias) <= LOGIT_BIAS_LIMIT:
                raise InvalidSamplingParams(
                    "logit_bias",
                    f"token {token}: bias must be between {-LOGIT_BIAS_LIMIT} and {LOGIT_BIAS_LIMIT}, got {bias}",
                )
        if len({token for token, _ in self.logit_bias}) != len(self.logit_bias):
            raise InvalidSamplingParams("logit_bias", "a token id appears twice")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0

    @property
    def penalized(self) -> bool:
        """Uses presence or frequency penalties (needs the output's token counts)."""
        return self.presence_penalty != 0.0 or self.frequency_penalty != 0.0


@dataclasses.dataclass(frozen=True)
class GenerationRequest:
    request_id: str
    prompt_token_ids: tuple[int, ...]
    sampling: SamplingParams
    # time.monotonic() after which the request is aborted; None = no deadline.
    deadline: float | None = None
    # Constrained decoding: from Engine.compile_grammar (compiled off the
    # compute thread); None = unconstrained.
    grammar: Grammar | None = None


@dataclasses.dataclass(frozen=True)
class Usage:
    prompt_tokens: int
    completion_tokens: int
    cached_prompt_tokens: int = 0  # of prompt_tokens, taken from the prefix cache instead of computed

    @property
    def total_tokens(self) -> int:
        return self.prompt_tokens + self.completion_tokens


@dataclasses.dataclass(frozen=True)
class RequestTiming:
    """time.monotonic() stamps of one request's life inside the engine, carried
    by its final event so that callers can derive queue, prefill and decode
    time without the engine knowing about metrics or tracing."""

    submitted: float  # accepted into the waiting queue
    admitted: float | None  # given a KV-cache slot (None: ended while waiting)
    first_token: float | None  # first token sampled, i.e. prefill done (None: no token)
    finished: float  # final event created


@dataclasses.dataclass(frozen=True)
class TokenLogprobs:
    """The logprob of one generated token and the most likely alternatives
    (descending; as many as top_logprobs asked), as (token id, logprob).
    Logprobs are of the distribution after penalties, logit_bias and the
    grammar mask, before temperature, top-k and top-p (see sampling.py)."""

    token_id: int
    logprob: float
    top: tuple[tuple[int, float], ...] = ()


@dataclasses.dataclass(frozen=True)
class TokenEvent:
    """One generated token's worth of output (the final event may carry no
    token). `text` may be empty: a token can end inside a multi-byte character,
    or its text is held back because it may start a stop string. The last event
    has `finish_reason` and `usage` set."""

    text: str
    finish_reason: FinishReason | None = None
    usage: Usage | None = None
    error: str | None = None  # set when finish_reason is ERROR
    timing: RequestTiming | None = None  # set on the final event
    index: int = 0  # the choice (0..n-1) this event belongs to; each choice has its own final event
    # The token's logprobs, when the request asked for them and the event
    # carries a generated token (not on the end-of-sequence token).
    logprobs: TokenLogprobs | None = None

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None


class EngineOverloaded(Exception):
    """Running and waiting requests are at their configured limits."""

    def __init__(self, running: int, waiting: int) -> None:
        super().__init__(f"server is at capacity ({running} running, {waiting} waiting); retry later")
        self.running = running
        self.waiting = waiting


class EngineStopped(Exception):
    """The engine no longer accepts requests (shutting down)."""


@dataclasses.dataclass(frozen=True)
class EngineSetup:
    """What the engine settled on at start-up. `--quantization auto` is
    decided per node (kernels built, a probe of their speed), so replicas of
    one deployment may differ: this says which path a replica runs."""

    quantization: str  # resolved: int5, int8, int8-weight-only, int4 or none
    requested_quantization: str  # --quantization as given, e.g. auto
    native_layers: bool  # the decoder layers in one native call per pass (the fast CPU path)
    kv_cache_dtype: str  # float32, bfloat16, ...
    kernels: str  # what the products run on: avx512-amx, avx512-vnni, avx2 (the native kernels) or torch


@dataclasses.dataclass(frozen=True)
class EngineStats:
    running: int
    waiting: int
    kv_cache_used_tokens: int
    kv_cache_capacity_tokens: int
    generated_tokens_total: int
    prompt_tokens_total: int = 0  # of admitted requests
    prefix_cache_hit_tokens_total: int = 0  # of those, taken from the prefix cache
    prefix_cache_blocks_used: int = 0
    prefix_cache_blocks_capacity: int = 0
    prefix_cache_evictions_total: int = 0
    draft_tokens_total: int = 0  # speculative draft tokens verified
    accepted_draft_tokens_total: int = 0  # of those, kept (each one a token gained without its own pass)
    compute_threads: int = 0  # the forward passes' threads: --threads, or fewer while the host withholds cores
    # time.monotonic() when the compute thread last woke up for work or
    # finished a step: the liveness check's sign of progress.
    last_progress: float = 0.0

    def stalled_seconds(self, now: float) -> float:
        """How long requests have been queued or running without the compute
        thread making progress (0 when idle): a wedged engine thread grows it."""
        if not (self.running or self.waiting):
            return 0.0
        return max(0.0, now - self.last_progress)


class EngineObserver(Protocol):
    """Optional hooks the compute thread calls between forward passes. Keep
    them cheap and non-blocking."""

    def decode_step(self, batch_size: int) -> None:
        """One decode forward pass ran for `batch_size` requests."""

    def prefix_reused(self, tokens: int) -> None:
        """A prompt's first `tokens` positions came from the prefix cache."""

    def prefix_blocks_evicted(self, count: int) -> None:
        """The prefix cache evicted `count` blocks to store new ones."""

    def draft_tokens(self, count: int) -> None:
        """A request's pass verified `count` speculative draft tokens."""

    def accepted_draft_tokens(self, count: int) -> None:
        """`count` of a request's draft tokens were accepted."""
