"""Tool calling in Qwen2.5's own format, for both transports.

The chat template renders the tools (as OpenAI-style function definitions)
into the system prompt; the model answers with one or more

    <tool_call>
    {"name": "get_weather", "arguments": {"city": "Paris"}}
    </tool_call>

blocks (several = parallel calls), possibly after some text. Small models
often drop the tags and answer a call as a bare JSON object, sometimes in a
```json fence: an answer that is nothing but such calls counts as calls too
(llama.cpp's Qwen/Hermes parser accepts the same). This module
holds the request types, the Lark grammar that forces such calls (tool_choice
required or a named function: the arguments always match the tool's
parameters schema), and the incremental parser that splits generated text
into content and ToolCalls without leaking the markup into the content.
Nothing here knows gRPC or HTTP.
"""

from __future__ import annotations

import dataclasses
import enum
import json
import re
import uuid
from collections.abc import Sequence
from typing import Any

from .errors import InvalidArgument, excerpt

OPEN_TAG = "<tool_call>"
CLOSE_TAG = "</tool_call>"
# OpenAI's rule for function names.
NAME_PATTERN = re.compile(r"^[A-Za-z0-9_-]{1,64}$")
MAX_TOOLS = 128
# Parallel calls one forced answer may hold: bounds an answer that would
# otherwise call tools until max_tokens.
MAX_PARALLEL_CALLS = 4
# The grammar writes arguments as json.dumps does (the layout the template
# uses for calls in the history); unbounded whitespace would let a sampled
# model pad until max_tokens.
_JSON_LAYOUT = {"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": "}


@dataclasses.dataclass(frozen=True)
class Tool:
    """A function the model may call. `parameters` is a JSON Schema as JSON
    text ("" = any JSON object)."""

    name: str
    description: str = ""
    parameters: str = ""

    def schema(self) -> dict[str, Any]:
        return json.loads(self.parameters) if self.parameters else {"type": "object"}

    def template_entry(self) -> dict[str, Any]:
        """The definition as the chat template renders it (OpenAI's shape,
        which Qwen2.5 was trained on)."""
        function: dict[str, Any] = {"name": self.name}
        if self.description:
            function["description"] = self.description
        function["parameters"] = self.schema()
        return {"type": "function", "function": function}


class ToolChoiceMode(enum.StrEnum):
    NONE = "none"  # tools are not shown to the model; the answer is text
    AUTO = "auto"  # the model decides (unconstrained)
    REQUIRED = "required"  # at least one call, constrained to the tools' schemas
    FUNCTION = "function"  # exactly one call of ToolChoice.name, constrained


@dataclasses.dataclass(frozen=True)
class ToolChoice:
    mode: ToolChoiceMode = ToolChoiceMode.AUTO
    name: str = ""  # for FUNCTION


@dataclasses.dataclass(frozen=True)
class ToolCall:
    """A call the model made; `arguments` is JSON text (an object)."""

    id: str
    name: str
    arguments: str

    def template_entry(self) -> dict[str, Any]:
        """As the chat template renders a call in the history: it writes
        `arguments` with tojson, so it wants the object, not its text."""
        try:
            arguments: Any = json.loads(self.arguments) if self.arguments else {}
        except ValueError:
            arguments = self.arguments
        return {"id": self.id, "type": "function", "function": {"name": self.name, "arguments": arguments}}


def new_call_id() -> str:
    return f"call_{uuid.uuid4().hex[:24]}"


def validate_tools(tools: Sequence[Tool], choice: ToolChoice | None) -> ToolChoice:
    """Checks names, schemas' JSON shape and the choice; returns the effective
    choice (auto with tools, none without). Schemas are compiled later by the
    caller, which names the tool whose schema the grammar library refuses."""
    if len(tools) > MAX_TOOLS:
        raise InvalidArgument("tools", f"at most {MAX_TOOLS} tools, got {len(tools)}")
    names: set[str] = set()
    for index, tool in enumerate(tools):
        if not NAME_PATTERN.match(tool.name):
            raise InvalidArgument(
                f"tools[{index}].function.name", f"must match {NAME_PATTERN.pattern}, got {excerpt(tool.name)!r}"
            )
        if tool.name in names:
            raise InvalidArgument(f"tools[{index}].function.name", f"duplicate tool name {tool.name!r}")
        names.add(tool.name)
        if tool.parameters:
            try:
                schema = json.loads(tool.parameters)
            except ValueError as exc:
                raise InvalidArgument(f"tools[{index}].function.parameters", f"not valid JSON: {exc}") from None
            if not isinstance(schema, dict) or schema.get("type", "object") != "object":
                raise InvalidArgument(
                    f"tools[{index}].function.parameters", 'must be a JSON Schema object with "type": "object"'
                )
    if choice is None:
        return ToolChoice(ToolChoiceMode.AUTO if tools else ToolChoiceMode.NONE)
    if choice.mode in (ToolChoiceMode.REQUIRED, ToolChoiceMode.FUNCTION) and not tools:
        raise InvalidArgument("tool_choice", f"{choice.mode.value!r} needs at least one tool in tools")
    if choice.mode is ToolChoiceMode.FUNCTION and choice.name not in names:
        raise InvalidArgument("tool_choice", f"names function {excerpt(choice.name)!r}, which is not among the tools")
    if choice.mode is ToolChoiceMode.AUTO and not tools:
        return ToolChoice(ToolChoiceMode.NONE)
    return choice


def _call_schema(tool: Tool) -> dict[str, Any]:
    return {
        "type": "object",
        "properties": {"name": {"const": tool.name}, "arguments": tool.schema()},
        "required": ["name", "arguments"],
        "additionalProperties": False,
        "x-guidance": _JSON_LAYOUT,
    }


def forced_call_grammar(
    tools: Sequence[Tool], choice: ToolChoice, parallel: bool, tag_tokens: Sequence[int] | None = None
) -> str:
    """The Lark grammar (llguidance dialect) of an answer that is nothing but
    tool calls in the template's format: one call of the named function, or
    1..MAX_PARALLEL_CALLS (one if not `parallel`) calls of any of the tools,
    each one's arguments valid against that tool's parameters schema.
    `tag_tokens`: the ids of the <tool_call> and </tool_call> tokens when the
    vocabulary has them (Qwen2.5's does): the grammar must name such added
    tokens by id, llguidance does not match them as text."""
    chosen = [t for t in tools if t.name == choice.name] if choice.mode is ToolChoiceMode.FUNCTION else list(tools)
    repeat = parallel and choice.mode is ToolChoiceMode.REQUIRED
    rules = [
        f'start: call ("\\n" call){{,{MAX_PARALLEL_CALLS - 1}}}' if repeat else "start: call",
        _call_rule(tag_tokens),
        "body: " + " | ".join(f"tool{i}" for i in range(len(chosen))),
    ]
    rules += [f"tool{i}: %json {json.dumps(_call_schema(tool))}" for i, tool in enumerate(chosen)]
    return "\n".join(rules)


@dataclasses.dataclass(frozen=True)
class ContentDelta:
    text: str


@dataclasses.dataclass(frozen=True)
class CallDelta:
    index: int  # position among this answer's calls
    call: ToolCall


def _parse_call(body: str, names: frozenset[str]) -> tuple[str, str] | None:
    """(name, arguments JSON) of one call's JSON body, None if it is not a
    well-formed call of a known tool."""
    try:
        value = json.loads(body)
    except ValueError:
        return None
    return _call_of(value, names)


def _call_of(value: Any, names: frozenset[str]) -> tuple[str, str] | None:
    if not isinstance(value, dict) or value.get("name") not in names:
        return None
    arguments = value.get("arguments", {})
    if isinstance(arguments, str):  # some answers spell the object as a string
        try:
            arguments = json.loads(arguments)
        except ValueError:
            return None
    if not isinstance(arguments, dict):
        return None
    return value["name"], json.dumps(arguments, ensure_ascii=False)


# What a tagless call starts with, whitespace removed, after an optional fence.
_BARE_CALL_START = '{"name":'
_FENCE, _FENCE_LANGUAGE = "```", "json"


def _bare_call_start(text: str) -> bool | None:
    """Whether an answer that begins with `text` may be tagless calls: True
    (it starts like one), False (it cannot be), None (too short to tell)."""
    compact = "".join(text.split())
    if _FENCE.startswith(compact):
        return None
    if compact.startswith(_FENCE):
        compact = compact[len(_FENCE) :]
        if _FENCE_LANGUAGE.startswith(compact):
            return None
        compact = compact.removeprefix(_FENCE_LANGUAGE)
    if _BARE_CALL_START.startswith(compact):
        return None
    return compact.startswith(_BARE_CALL_START)


def _bare_calls(text: str, names: frozenset[str]) -> list[tuple[str, str]]:
    """The calls of an answer that is only tagless calls (JSON objects, one
    after another, optionally in one fence); [] if it is anything else."""
    body = text.strip()
    if body.startswith(_FENCE):
        body = body[len(_FENCE) :].removeprefix(_FENCE_LANGUAGE).strip().removesuffix(_FENCE).strip()
    decoder, calls, index = json.JSONDecoder(), [], 0
    while index < len(body):
        try:
            value, index = decoder.raw_decode(body, index)
        except ValueError:
            return []
        call = _call_of(value, names)
        if call is None:
            return []
        calls.append(call)
        while index < len(body) and body[index].isspace():
            index += 1
    return calls


class ToolCallParser:
    """Splits generated text, fed piece by piece, into content and complete
    tool calls. Text that may be the start of a <tool_call> tag is held back
    until it is decided; a call is released once its closing tag arrives
    (its arguments in one piece). A block that is not a well-formed call of a
    known tool stays content, as the model wrote it. An answer that starts
    like a tagless call is held back whole and read at its end."""

    def __init__(self, tool_names: Sequence[str]) -> None:
        self._names = frozenset(tool_names)
        self._buffer = ""
        self._in_call = False
        # None until the answer's start tells whether it may be tagless calls.
        self._bare: bool | None = None
        self.calls: list[ToolCall] = []

    def feed(self, text: str) -> list[ContentDelta | CallDelta]:
        self._buffer += text
        if self._bare is None:
            self._bare = _bare_call_start(self._buffer)
        if self._bare is not False:
            return []
        return self._split_tagged()

    def _split_tagged(self) -> list[ContentDelta | CallDelta]:
        out: list[ContentDelta | CallDelta] = []
        while True:
            if not self._in_call:
                start = self._buffer.find(OPEN_TAG)
                if start < 0:
                    keep = _partial_suffix(self._buffer, OPEN_TAG)
                    released = self._buffer[: len(self._buffer) - keep]
                    self._buffer = self._buffer[len(released) :]
                    self._content(out, released)
                    return out
                self._content(out, self._buffer[:start])
                self._buffer = self._buffer[start:]
                self._in_call = True
            end = self._buffer.find(CLOSE_TAG)
            if end < 0:
                return out
            block = self._buffer[: end + len(CLOSE_TAG)]
            self._buffer = self._buffer[len(block) :]
            self._in_call = False
            parsed = _parse_call(block[len(OPEN_TAG) : -len(CLOSE_TAG)], self._names)
            if parsed is None:
                self._content(out, block)
                continue
            self._call(out, parsed)

    def flush(self) -> list[ContentDelta | CallDelta]:
        """The end of the answer: whatever is held back is content (an
        unclosed call, cut by max_tokens, is shown as written)."""
        out: list[ContentDelta | CallDelta] = []
        if self._bare is not False:
            self._bare = False
            bare = _bare_calls(self._buffer, self._names)
            if bare:
                self._buffer = ""
                for parsed in bare:
                    self._call(out, parsed)
                return out
            out = self._split_tagged()
        rest, self._buffer, self._in_call = self._buffer, "", False
        self._content(out, rest)
        return out

    def _call(self, out: list[ContentDelta | CallDelta], parsed: tuple[str, str]) -> None:
        call = ToolCall(new_call_id(), *parsed)
        out.append(CallDelta(len(self.calls), call))
        self.calls.append(call)

    def _content(self, out: list[ContentDelta | CallDelta], text: str) -> None:
        # After a call, whitespace alone is the separator between calls, not content.
        if text and not (self.calls and not text.strip()):
            out.append(ContentDelta(text))


def _partial_suffix(text: str, tag: str) -> int:
    """Length of the longest suffix of `text` that is a proper prefix of `tag`."""
    for length in range(min(len(tag) - 1, len(text)), 0, -1):
        if text.endswith(tag[:length]):
            return length
    return 0


def _call_rule(tag_tokens: Sequence[int] | None) -> str:
    if tag_tokens is None:
        return "call: " + json.dumps(OPEN_TAG + "\n") + " body " + json.dumps("\n" + CLOSE_TAG)
    open_id, close_id = tag_tokens
    return f'call: <[{open_id}]> "\\n" body "\\n" <[{close_id}]>'
