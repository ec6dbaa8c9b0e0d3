"""What this CPU offers, as /proc/cpuinfo says (Linux; nothing elsewhere),
read once. Torch-free, so the benchmarks can ask too."""

from __future__ import annotations

import functools
import pathlib
import types
from collections.abc import Mapping


@functools.cache
def cpu_info() -> Mapping[str, str]:
    """The first processor's fields: "model name", "cpu family", "model", "flags", ..."""
    fields: dict[str, str] = {}
    try:
        text = pathlib.Path("/proc/cpuinfo").read_text()
    except OSError:
        return types.MappingProxyType(fields)
    for line in text.splitlines():
        if not line.strip():
            if fields:  # the end of the first processor's block
                break
            continue
        key, _, value = line.partition(":")
        fields.setdefault(key.strip(), value.strip())
    return types.MappingProxyType(fields)


def cpu_flags() -> frozenset[str]:
    """The instruction-set flags ("avx2", "avx512_vnni", ...)."""
    return frozenset(cpu_info().get("flags", "").split())
