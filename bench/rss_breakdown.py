"""Where a process's resident memory goes, from /proc/PID/smaps.

    python bench/rss_breakdown.py PID [--kv-bytes N] [--top 10]

Groups every mapping: the model's weights file, torch's shared libraries,
other shared libraries and files, the [heap] (main arena), anonymous mappings
that look like glibc thread arenas (64 MiB reservations), the KV cache (anonymous
mappings of --kv-bytes, or K and V merged, see ModelRunner), and other anonymous mappings
(mostly tensors above glibc's mmap threshold). Reads only; needs the same user.
"""

from __future__ import annotations

import argparse
import collections
import dataclasses
import re

_HEADER = re.compile(r"^([0-9a-f]+)-([0-9a-f]+) (\S+) \S+ \S+ \S+\s*(.*)$")
_ARENA_BYTES = 64 << 20  # glibc's HEAP_MAX_SIZE on 64-bit: each thread arena reserves this much


@dataclasses.dataclass
class Mapping:
    start: int
    size: int
    perms: str
    path: str
    rss_kb: int = 0
    anon_kb: int = 0


def read_smaps(pid: int) -> list[Mapping]:
    mappings: list[Mapping] = []
    with open(f"/proc/{pid}/smaps") as smaps:
        for line in smaps:
            header = _HEADER.match(line)
            if header:
                start, end = int(header[1], 16), int(header[2], 16)
                mappings.append(Mapping(start, end - start, header[3], header[4].strip()))
            elif line.startswith("Rss:"):
                mappings[-1].rss_kb = int(line.split()[1])
            elif line.startswith("Anonymous:"):
                mappings[-1].anon_kb = int(line.split()[1])
    return mappings


def _arena_starts(mappings: list[Mapping]) -> set[int]:
    """Thread arenas: 64 MiB-aligned anonymous reservations, a rw- part followed
    by a ---p remainder, together exactly 64 MiB."""
    starts = set()
    for index, m in enumerate(mappings):
        if m.path or m.start % _ARENA_BYTES:
            continue
        total, j = 0, index
        while j < len(mappings) and not mappings[j].path and mappings[j].start == m.start + total:
            total += mappings[j].size
            if total >= _ARENA_BYTES:
                break
            j += 1
        if total == _ARENA_BYTES:
            starts.update(mappings[k].start for k in range(index, j + 1))
    return starts


def classify(mappings: list[Mapping], kv_bytes: int) -> dict[str, list[Mapping]]:
    arenas = _arena_starts(mappings)
    groups: dict[str, list[Mapping]] = collections.defaultdict(list)
    for m in mappings:
        if m.path.endswith((".safetensors", ".gguf", ".bin")):
            key = "weights file (mmap)"
        elif m.path == "[heap]":
            key = "[heap] main arena"
        elif m.path.startswith("[stack") or m.path in ("[vvar]", "[vdso]", "[vsyscall]", "[vvar_vclock]"):
            key = "stacks, vdso"
        elif m.path.startswith("/") and "/torch/" in m.path and ".so" in m.path:
            key = "torch .so"
        elif m.path.startswith("/") and ".so" in m.path:
            key = "other .so"
        elif m.path.startswith("/"):
            key = "other files"
        elif kv_bytes and min(abs(m.size - kv_bytes), abs(m.size - 2 * kv_bytes)) <= 4096:
            # K and V are mapped one after the other; the kernel may merge the two.
            key = "KV cache mmap"
        elif m.start in arenas:
            key = "thread arenas (anon, 64 MiB)"
        else:
            key = "other anon (large mallocs/tensors)"
        groups[key].append(m)
    return groups


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("pid", type=int)
    parser.add_argument("--kv-bytes", type=int, default=0, help="size of one of the K/V cache mappings")
    parser.add_argument("--top", type=int, default=0, help="also list the N largest anonymous mappings")
    args = parser.parse_args()
    mappings = read_smaps(args.pid)
    groups = classify(mappings, args.kv_bytes)
    total = sum(m.rss_kb for m in mappings)
    print(f"{'group':38} {'RSS MB':>8} {'anon MB':>8} {'mappings':>8}")
    for key, members in sorted(groups.items(), key=lambda item: -sum(m.rss_kb for m in item[1])):
        rss = sum(m.rss_kb for m in members) / 1024
        anon = sum(m.anon_kb for m in members) / 1024
        print(f"{key:38} {rss:8.1f} {anon:8.1f} {len(members):8d}")
    print(f"{'total':38} {total / 1024:8.1f}")
    with open(f"/proc/{args.pid}/status") as status:
        for line in status:
            if line.startswith(("VmRSS", "VmHWM", "RssAnon", "RssFile", "Threads")):
                print(line.rstrip())
    if args.top:
        anon = sorted((m for m in mappings if not m.path.startswith("/")), key=lambda m: -m.rss_kb)
        for m in anon[: args.top]:
            print(f"  {m.start:#x} size {m.size / 2**20:9.1f} MiB rss {m.rss_kb / 1024:8.1f} MB {m.perms} {m.path}")


if __name__ == "__main__":
    main()
