"""Grammar-constrained decoding libraries compared on this CPU with the real
Qwen tokenizer (vocab 151,936): xgrammar, llguidance, outlines-core.

For each library, per round:
  - setup: the library's tokenizer preparation (once per server), seconds;
  - compile: a typical form schema -> a grammar ready to match, seconds;
  - mask: the per-token cost of computing the allowed-token mask, replaying
    B = 1 and B = 16 valid answers token by token (mask, then consume the
    token), microseconds per token and milliseconds per batched step.

Every library replays the same token sequences (the real tokenizer's
encoding of schema-valid JSON documents), so they do the same work. Rounds
alternate the libraries (A B C, A B C, ...) because the machine is shared:
report the median and the spread over rounds, with the load average.

    python bench/grammar_libs.py --rounds 5
    PYTHONPATH=/tmp/glibs python bench/grammar_libs.py   # libraries not in the venv

A library that is not importable is reported as such and skipped.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import time
from collections.abc import Callable
from typing import Any

VOCAB = 151_936

SCHEMA: dict[str, Any] = {
    "type": "object",
    "properties": {
        "name": {"type": "string"},
        "age": {"type": "integer", "minimum": 0},
        "email": {"type": "string"},
        "subscribed": {"type": "boolean"},
        "tags": {"type": "array", "items": {"type": "string"}},
        "address": {
            "type": "object",
            "properties": {"street": {"type": "string"}, "city": {"type": "string"}, "zip": {"type": "string"}},
            "required": ["street", "city", "zip"],
            "additionalProperties": False,
        },
        "role": {"enum": ["admin", "user", "guest"]},
    },
    "required": ["name", "age", "email", "subscribed", "tags", "address", "role"],
    "additionalProperties": False,
}

_WORDS = ["alpha", "Bücher", "north", "data", "grpc", "edge", "device", "form", "Zürich", "tokyo", "ok"]


def documents(count: int, seed: int = 0) -> list[str]:
    """`count` different schema-valid answers, compact (every library is set
    to allow no whitespace, so all accept exactly the same texts)."""
    rng = random.Random(seed)
    docs = []
    for index in range(count):
        word = lambda: rng.choice(_WORDS)  # noqa: E731
        doc = {
            "name": f"{word().title()} {word().title()}",
            "age": rng.randint(0, 99),
            "email": f"{word()}.{index}@example.com",
            "subscribed": rng.random() < 0.5,
            "tags": [word() for _ in range(rng.randint(0, 4))],
            "address": {
                "street": f"{rng.randint(1, 999)} {word().title()} Street",
                "city": word().title(),
                "zip": f"{rng.randint(10000, 99999)}",
            },
            "role": rng.choice(["admin", "user", "guest"]),
        }
        docs.append(json.dumps(doc, ensure_ascii=False, separators=(",", ":")))
    return docs


# Each library: setup(hf_tokenizer) -> state; compile(state) -> compiled;
# new_matcher(state, compiled) -> matcher; fill(matcher, bitmask_row);
# consume(matcher, token) -> bool.


class XGrammar:
    name = "xgrammar"

    def __init__(self) -> None:
        import torch
        import xgrammar

        self.xgr, self.torch = xgrammar, torch
        self.version = xgrammar.__version__ if hasattr(xgrammar, "__version__") else "?"

    def setup(self, tokenizer: Any) -> Any:
        info = self.xgr.TokenizerInfo.from_huggingface(tokenizer, vocab_size=VOCAB)
        return self.xgr.GrammarCompiler(info, max_threads=1, cache_enabled=False)

    def compile(self, compiler: Any) -> Any:
        return compiler.compile_json_schema(json.dumps(SCHEMA), any_whitespace=False, separators=(",", ":"))

    def bitmask(self, batch: int) -> Any:
        return self.xgr.allocate_token_bitmask(batch, VOCAB)

    def new_matcher(self, compiled: Any) -> Any:
        return self.xgr.GrammarMatcher(compiled)

    def fill(self, matcher: Any, bitmask: Any, row: int) -> None:
        matcher.fill_next_token_bitmask(bitmask, row)

    def consume(self, matcher: Any, token: int) -> bool:
        return matcher.accept_token(token)


class LLGuidance:
    name = "llguidance"

    def __init__(self) -> None:
        import llguidance
        import llguidance.hf
        import llguidance.torch

        self.llg = llguidance
        self.version = getattr(llguidance, "__version__", "?")

    def setup(self, tokenizer: Any) -> Any:
        return self.llg.hf.from_tokenizer(tokenizer, n_vocab=VOCAB)

    def compile(self, tokenizer: Any) -> Any:
        grammar = self.llg.LLMatcher.grammar_from_json_schema(
            SCHEMA, defaults={"whitespace_flexible": False, "item_separator": ",", "key_separator": ":"}
        )
        matcher = self.llg.LLMatcher(tokenizer, grammar)  # builds the lexer: llguidance's "compile"
        if matcher.is_error():
            raise RuntimeError(matcher.get_error())
        return matcher

    def bitmask(self, batch: int) -> Any:
        return self.llg.torch.allocate_token_bitmask(batch, VOCAB)

    def new_matcher(self, pristine: Any) -> Any:
        return pristine.deep_copy()  # as the server does: one compile per schema, a copy per request

    def fill(self, matcher: Any, bitmask: Any, row: int) -> None:
        self.llg.torch.fill_next_token_bitmask(matcher, bitmask, row)

    def consume(self, matcher: Any, token: int) -> bool:
        return matcher.consume_token(token)


def _byte_level_alphabet() -> dict[int, str]:
    """GPT-2's byte -> printable character map, which byte-level BPE vocabularies are written in."""
    printable = (
        list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    )
    mapping, extra = {}, 0
    for byte in range(256):
        if byte in printable:
            mapping[byte] = chr(byte)
        else:
            mapping[byte] = chr(256 + extra)
            extra += 1
    return mapping


class OutlinesCore:
    name = "outlines-core"

    def __init__(self) -> None:
        import outlines_core
        import torch

        self.oc, self.torch = outlines_core, torch
        self.version = "?"

    def setup(self, tokenizer: Any) -> Any:
        byte_of = {char: byte for byte, char in _byte_level_alphabet().items()}
        tokens: dict[bytes, list[int]] = {}
        special = set(tokenizer.all_special_ids)
        for text, token_id in tokenizer.get_vocab().items():
            if token_id in special or token_id == tokenizer.eos_token_id:
                continue
            tokens.setdefault(bytes(byte_of[c] for c in text), []).append(token_id)
        return self.oc.Vocabulary(tokenizer.eos_token_id, tokens)

    def compile(self, vocabulary: Any) -> Any:
        regex = self.oc.json_schema.build_regex_from_schema(json.dumps(SCHEMA), whitespace_pattern="")
        return self.oc.Index(regex, vocabulary)

    def bitmask(self, batch: int) -> Any:
        return self.torch.zeros(batch, (VOCAB + 31) // 32, dtype=self.torch.int32)

    def new_matcher(self, index: Any) -> Any:
        return self.oc.Guide(index)

    def fill(self, guide: Any, bitmask: Any, row: int) -> None:
        view = bitmask[row]
        guide.write_mask_into(view.data_ptr(), view.numel(), view.element_size())

    def consume(self, guide: Any, token: int) -> bool:
        guide.advance(token, return_tokens=False)
        return True


LIBRARIES: list[Callable[[], Any]] = [XGrammar, LLGuidance, OutlinesCore]


def replay(lib: Any, compiled: Any, sequences: list[list[int]], eos: int) -> tuple[float, float, int]:
    """Replay len(sequences) streams in lock step; returns (total fill
    seconds, mean batched-step milliseconds, tokens)."""
    batch = len(sequences)
    bitmask = lib.bitmask(batch)
    matchers = [lib.new_matcher(compiled) for _ in sequences]
    fill_total, steps, tokens = 0.0, [], 0
    for position in range(max(map(len, sequences))):
        start = time.perf_counter()
        live = [(row, m) for row, m in enumerate(matchers) if position < len(sequences[row])]
        for row, matcher in live:
            lib.fill(matcher, bitmask, row)
        elapsed = time.perf_counter() - start
        fill_total += elapsed
        steps.append(elapsed)
        for row, matcher in live:
            token = sequences[row][position]
            if not bitmask[row, token // 32] >> (token % 32) & 1:
                raise AssertionError(f"{lib.name} masked out a valid token at position {position}")
            if not lib.consume(matcher, token):
                raise AssertionError(f"{lib.name} refused a valid token at position {position}")
            tokens += 1
    for row, matcher in enumerate(matchers):
        lib.fill(matcher, bitmask, row)
        if not bitmask[row, eos // 32] >> (eos % 32) & 1:
            raise AssertionError(f"{lib.name} does not allow EOS after a complete document")
    return fill_total, statistics.mean(steps) * 1e3, tokens


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=None, help="tokenizer folder (default: the server's default model)")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--streams", default="1,16")
    parser.add_argument(
        "--threads", type=int, default=1, help="torch threads (the engine's compute thread has its own)"
    )
    args = parser.parse_args()

    import torch
    from transformers import AutoTokenizer

    from service.config import default_model_path

    torch.set_num_threads(args.threads)
    tokenizer = AutoTokenizer.from_pretrained(args.model or default_model_path())
    stream_counts = [int(s) for s in args.streams.split(",")]
    docs = documents(max(stream_counts))
    sequences = [tokenizer.encode(doc) for doc in docs]
    print(f"documents: {len(docs)}, tokens each: {min(map(len, sequences))}..{max(map(len, sequences))}")

    libs = []
    for factory in LIBRARIES:
        try:
            libs.append(factory())
        except ImportError as exc:
            print(f"{factory.name}: not importable ({exc}); skipped")
    results: dict[str, dict[str, list[float]]] = {lib.name: {} for lib in libs}
    prepared = {}
    for lib in libs:
        start = time.perf_counter()
        prepared[lib.name] = lib.setup(tokenizer)
        results[lib.name]["setup_s"] = [time.perf_counter() - start]
    loads = []
    for round_index in range(args.rounds):
        order = libs if round_index % 2 == 0 else list(reversed(libs))
        loads.append(os.getloadavg()[0])
        for lib in order:
            record = results[lib.name]
            start = time.perf_counter()
            compiled = lib.compile(prepared[lib.name])
            record.setdefault("compile_s", []).append(time.perf_counter() - start)
            for streams in stream_counts:
                fill_total, step_ms, tokens = replay(lib, compiled, sequences[:streams], tokenizer.eos_token_id)
                record.setdefault(f"us_per_token_B{streams}", []).append(fill_total / tokens * 1e6)
                record.setdefault(f"ms_per_step_B{streams}", []).append(step_ms)
    print(f"rounds: {args.rounds}; load average (1 min) at each round: {', '.join(f'{load:.1f}' for load in loads)}")
    keys = ["setup_s", "compile_s"] + [f"{k}_B{b}" for b in stream_counts for k in ("us_per_token", "ms_per_step")]
    print("| library | " + " | ".join(keys) + " |")
    print("|---" * (len(keys) + 1) + "|")
    for lib in libs:
        cells = []
        for key in keys:
            values = results[lib.name][key]
            median = statistics.median(values)
            cells.append(f"{median:.3g}" if len(values) == 1 else f"{median:.3g} ({min(values):.3g}-{max(values):.3g})")
        print(f"| {lib.name} {lib.version} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
