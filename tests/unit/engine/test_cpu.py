import pathlib

import pytest

from service.engine.cpu import cpu_flags, cpu_info

CPUINFO = pathlib.Path("/proc/cpuinfo")


@pytest.mark.skipif(not CPUINFO.is_file(), reason="no /proc/cpuinfo")
def test_reads_the_first_processors_fields_and_flags():
    first = {}
    for line in CPUINFO.read_text().split("\n\n")[0].splitlines():
        key, _, value = line.partition(":")
        first[key.strip()] = value.strip()
    assert dict(cpu_info()) == first
    assert cpu_info()["processor"] == "0"
    assert cpu_flags() == frozenset(first.get("flags", "").split())


def test_is_read_once_and_cannot_be_changed():
    assert cpu_info() is cpu_info()
    with pytest.raises(TypeError):
        cpu_info()["flags"] = "avx9000"  # type: ignore[index]
