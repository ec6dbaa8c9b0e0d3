"""Validate a Grafana dashboard JSON against Grafana's schema as published in
grafana-foundation-sdk (generated from Grafana's CUE/TypeScript schema, pinned
to the 11.6 release in pyproject.toml).

Two checks, both needed because the SDK's decoders are lenient:
* round trip: decode with the SDK's models (panel options, field config and
  Prometheus queries through the plugin registry) and encode again; any key
  the schema does not know is dropped and shows up as a difference;
* types: every decoded value is checked against the model's type hints
  (strings, numbers, booleans, lists, nested models, and enum members).
"""

from __future__ import annotations

import enum
import json
import types
import typing

from grafana_foundation_sdk.cog.encoder import JSONEncoder
from grafana_foundation_sdk.cog.plugins import register_default_plugins
from grafana_foundation_sdk.models.dashboard import Dashboard

register_default_plugins()


def _paths(a: object, b: object, path: str = "$") -> list[str]:
    """Where two JSON values differ."""
    if isinstance(a, dict) and isinstance(b, dict):
        out = []
        for key in sorted(set(a) | set(b)):
            if key not in b:
                out.append(f"{path}.{key}: not in the schema")
            elif key not in a:
                out.append(f"{path}.{key}: added by the schema's defaults")
            else:
                out += _paths(a[key], b[key], f"{path}.{key}")
        return out
    if isinstance(a, list) and isinstance(b, list) and len(a) == len(b):
        return [p for i, (x, y) in enumerate(zip(a, b)) for p in _paths(x, y, f"{path}[{i}]")]
    return [] if a == b else [f"{path}: {a!r} became {b!r}"]


def _hints(cls: type) -> dict[str, object]:
    return typing.get_type_hints(cls, vars(__import__(cls.__module__, fromlist=["_"])))


def _check(value: object, hint: object, path: str) -> list[str]:
    if hint in (typing.Any, object):
        return _check_model(value, path) if hasattr(value, "to_json") else []
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        options = typing.get_args(hint)
        if value is None and type(None) in options:
            return []
        failures = [_check(value, option, path) for option in options if option is not type(None)]
        return [] if any(not f for f in failures) else min(failures, key=len)
    if origin is list:
        if not isinstance(value, list):
            return [f"{path}: expected a list, got {value!r}"]
        (item,) = typing.get_args(hint) or (typing.Any,)
        return [e for i, v in enumerate(value) for e in _check(v, item, f"{path}[{i}]")]
    if origin is dict:
        if not isinstance(value, dict):
            return [f"{path}: expected an object, got {value!r}"]
        _, item = typing.get_args(hint) or (str, typing.Any)
        return [e for k, v in value.items() for e in _check(v, item, f"{path}.{k}")]
    if origin is typing.Literal:
        return [] if value in typing.get_args(hint) else [f"{path}: {value!r} not one of {typing.get_args(hint)}"]
    if isinstance(hint, type):
        if issubclass(hint, enum.Enum):
            allowed = {member.value for member in hint}
            member_value = value.value if isinstance(value, enum.Enum) else value
            return [] if member_value in allowed else [f"{path}: {value!r} not one of {sorted(map(str, allowed))}"]
        if hint is bool:
            return [] if isinstance(value, bool) else [f"{path}: expected a boolean, got {value!r}"]
        if hint is int:
            ok = isinstance(value, int) and not isinstance(value, bool)
            return [] if ok else [f"{path}: expected an integer, got {value!r}"]
        if hint is float:
            ok = isinstance(value, (int, float)) and not isinstance(value, bool)
            return [] if ok else [f"{path}: expected a number, got {value!r}"]
        if hint is str:
            return [] if isinstance(value, str) else [f"{path}: expected a string, got {value!r}"]
        # A schema model (or a plugin variant such as a Prometheus query).
        if not isinstance(value, hint):
            return [f"{path}: expected {hint.__name__}, got {value!r}"]
        return _check_model(value, path) if hasattr(value, "to_json") else []
    return []


def _check_model(model: object, path: str) -> list[str]:
    errors = []
    for name, hint in _hints(type(model)).items():
        errors += _check(getattr(model, name, None), hint, f"{path}.{name}")
    return errors


def validate_dashboard(data: dict) -> list[str]:
    """Problems found in a dashboard JSON object (empty when it is valid)."""
    model = Dashboard.from_json(data)
    encoded = json.loads(json.dumps(model, cls=JSONEncoder))
    return _paths(data, encoded) + _check_model(model, "$")
