"""How many threads the next forward pass runs on: the configured count,
or fewer while the host does not give them their cores.

A pass of the native decoder stack waits at some 300 barriers for its
slowest thread. When neighbours take the cores, each barrier waits for a
thread the OS has set aside: beside two busy processes a one-row decode
pass took 2.0-2.5 s on 2 threads and 70-90 ms on 1 (load average 4.4 on 2
cores). The stack reports the least share of a pass's wall time that
any of its threads spent running; passes well below 1 mean that
contention, and the governor drops a thread. With fewer threads it tries
one more now and then (a probe), and keeps it if that pass ran unhindered;
a failed probe doubles the wait before the next, so a host that stays busy
costs a probe now and then, not every few steps."""

from __future__ import annotations

import logging
from collections import deque

_LOG = logging.getLogger(__name__)

# A pass whose least-running thread ran below this share of the wall time was hindered.
CONTENDED = 0.75
# Passes shorter than this say little (timer and scheduling noise): they are not counted.
MIN_PASS_SECONDS = 0.002
# This many hindered passes in a row are contention; one preemption is not.
WINDOW = 3
FIRST_PROBE_AFTER = 64  # passes
LAST_PROBE_AFTER = 4096


class ThreadGovernor:
    def __init__(self, threads: int) -> None:
        self.most = threads
        self.threads = threads
        self._shares: deque[float] = deque(maxlen=WINDOW)
        self._probe_after = FIRST_PROBE_AFTER
        self._since_change = 0
        self._probing = False

    def next_threads(self) -> int:
        """The thread count for the next pass: a probe of one more is due
        once enough passes ran on fewer."""
        self._probing = self.threads < self.most and self._since_change >= self._probe_after
        return self.threads + 1 if self._probing else self.threads

    def record(self, on_cpu: float, seconds: float) -> None:
        """The pass just run (on next_threads() threads): the least share of
        its wall time any of its threads ran, and its wall time."""
        if seconds < MIN_PASS_SECONDS:
            return
        self._since_change += 1
        if self._probing:
            self._probing = False
            if on_cpu >= CONTENDED:
                self._change(self.threads + 1, on_cpu)
                self._probe_after = FIRST_PROBE_AFTER
            else:
                self._since_change = 0
                self._probe_after = min(2 * self._probe_after, LAST_PROBE_AFTER)
            return
        if self.threads == 1:
            return
        self._shares.append(on_cpu)
        if len(self._shares) == WINDOW and max(self._shares) < CONTENDED:
            self._change(self.threads - 1, max(self._shares))

    def _change(self, threads: int, on_cpu: float) -> None:
        _LOG.info(
            "compute threads %d -> %d (least thread on its core %.0f %% of a pass)", self.threads, threads, 100 * on_cpu
        )
        self.threads = threads
        self._shares.clear()
        self._since_change = 0
