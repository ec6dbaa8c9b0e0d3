"""Grammar-constrained decoding with llguidance (see bench/README.md for why
this library): a constraint is compiled once per distinct grammar, each
request gets its own matcher, and before a constrained row is sampled its
logits are masked to the tokens the grammar allows next. End-of-sequence is
allowed only where the grammar may end, so a constrained answer that ends on
its own is complete.

A constraint is a JSON Schema (JSON mode is the schema {"type": "object"})
or a Lark grammar, which llguidance can combine with JSON Schemas (`%json`):
the form a tool call's wrapper would take.
"""

from __future__ import annotations

import functools
import threading
from typing import TYPE_CHECKING

import llguidance
import llguidance.hf
import llguidance.torch
import torch
from transformers import PreTrainedTokenizerFast

from .types import ConstraintKind, OutputConstraint

if TYPE_CHECKING:
    from llguidance._lib import JsonCompileOptions  # a TypedDict of the stubs only
    from transformers import PreTrainedTokenizerBase

# Answers are compact-ish JSON as json.dumps writes it. Without a fixed
# layout, whitespace is unbounded: a sampled model can pad with newlines
# until max_tokens and never close the document.
_JSON_LAYOUT: JsonCompileOptions = {"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": "}
# Distinct constraints kept compiled (a form's schema repeats request after request).
_COMPILED_CACHE_SIZE = 64


class InvalidGrammar(ValueError):
    """The constraint cannot be compiled; the message says why."""


class GrammarViolation(RuntimeError):
    """A sampled token was refused by the request's grammar (a bug, or a
    grammar that allows no continuation)."""


class Grammar:
    """A compiled constraint: immutable once built, shared by every request
    that uses the same one. `matcher()` gives a request its own state."""

    def __init__(self, pristine: llguidance.LLMatcher, constraint: OutputConstraint) -> None:
        self._pristine = pristine
        self.constraint = constraint

    def matcher(self) -> GrammarMatcher:
        return GrammarMatcher(self._pristine.deep_copy())


class GrammarMatcher:
    """One request's position in its grammar. Used by the compute thread only."""

    def __init__(self, matcher: llguidance.LLMatcher) -> None:
        self._matcher = matcher

    def fill_mask(self, bitmask: torch.Tensor, row: int) -> None:
        """Write the allowed next tokens into row `row` of an int32 bitmask."""
        llguidance.torch.fill_next_token_bitmask(self._matcher, bitmask, row)
        if self._matcher.is_error():
            raise GrammarViolation(self._matcher.get_error())

    def accept(self, token: int) -> None:
        if not self._matcher.consume_token(token):
            raise GrammarViolation(f"token {token} is not allowed here: {self._matcher.get_error()}")


class GrammarCompiler:
    """Compiles constraints against one tokenizer. Building the tokenizer's
    token trie takes seconds (and holds the GIL): do it at startup, before
    the server takes traffic. Thread-safe: the service compiles on its
    tokenizer thread while the compute thread matches."""

    def __init__(self, hf_tokenizer: PreTrainedTokenizerBase, vocab_size: int, eos_token_ids: frozenset[int]) -> None:
        if not isinstance(hf_tokenizer, PreTrainedTokenizerFast):
            raise TypeError(f"constrained decoding needs a fast (tokenizers) tokenizer, not {type(hf_tokenizer)}")
        self._tokenizer = llguidance.hf.from_tokenizer(
            hf_tokenizer, n_vocab=vocab_size, eos_token=sorted(eos_token_ids)
        )
        self._lock = threading.Lock()
        self._cached = functools.lru_cache(maxsize=_COMPILED_CACHE_SIZE)(self._compile)

    def compile(self, constraint: OutputConstraint) -> Grammar:
        """Raises InvalidGrammar when the constraint is not a usable grammar."""
        with self._lock:
            return self._cached(constraint)

    def _compile(self, constraint: OutputConstraint) -> Grammar:
        try:
            if constraint.kind is ConstraintKind.JSON_SCHEMA:
                grammar = llguidance.LLMatcher.grammar_from_json_schema(constraint.source, overrides=_JSON_LAYOUT)
            else:
                grammar = llguidance.LLMatcher.grammar_from_lark(constraint.source)
        except ValueError as exc:
            raise InvalidGrammar(str(exc)) from None
        matcher = llguidance.LLMatcher(self._tokenizer, grammar)
        if matcher.is_error():
            raise InvalidGrammar(matcher.get_error())
        return Grammar(matcher, constraint)


def allocate_bitmask(rows: int, vocab_size: int) -> torch.Tensor:
    return llguidance.torch.allocate_token_bitmask(rows, vocab_size)


_BIT_POSITIONS = torch.arange(32, dtype=torch.int32)


def apply_bitmask(logits: torch.Tensor, bitmask: torch.Tensor) -> None:
    """In place: logits [rows, vocab] of disallowed tokens -> -inf.
    bitmask: int32 [rows, ceil(vocab / 32)], bit i of word w = token 32w + i."""
    allowed = ((bitmask.unsqueeze(-1) >> _BIT_POSITIONS) & 1).bool().flatten(1)[:, : logits.shape[-1]]
    logits.masked_fill_(~allowed, float("-inf"))
