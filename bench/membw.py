"""A memory-bandwidth co-runner: one thread copying a buffer far larger than
any CPU cache, back and forth, until SIGTERM; then one JSON line with the
bandwidth it got.

It stands in for the neighbours on a shared Kubernetes node: batch-1 decode
of both servers is bound by how fast the weights stream from memory, which is
exactly what such a neighbour takes. `bench/loadgen.py --co-runner` runs it
beside each server in turn, so contention is measured, not assumed.

On a 2-core machine it also takes CPU time from the servers (one busy
thread): the figure it records is of a host that is busy, not only of a
memory bus that is shared.

    python bench/membw.py --mib 256      # Ctrl-C prints {"gib_per_s": ..., ...}
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import time

import numpy as np


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--mib", type=int, default=256, help="size of each of the two buffers (default: %(default)s)")
    args = parser.parse_args(argv)
    stop = False

    def request_stop(*_: object) -> None:
        nonlocal stop
        stop = True

    signal.signal(signal.SIGTERM, request_stop)
    signal.signal(signal.SIGINT, request_stop)
    source = np.ones(args.mib * 2**20 // 8, dtype=np.float64)
    target = np.empty_like(source)
    print("ready", flush=True)
    copies, started = 0, time.perf_counter()
    while not stop:
        np.copyto(target, source)
        source, target = target, source
        copies += 1
    seconds = time.perf_counter() - started
    # Each copy reads one buffer and writes the other.
    moved = copies * 2 * source.nbytes
    report = {"gib_per_s": moved / seconds / 2**30 if seconds > 0 else 0.0, "seconds": seconds, "pid": os.getpid()}
    print(json.dumps(report), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
