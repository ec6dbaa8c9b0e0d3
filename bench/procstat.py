"""Process and machine accounting from /proc: CPU seconds of the server, of
this load generator and of everything else, and the server's memory.

A benchmark on a 2-core machine is only as good as the machine is quiet, so a
sampler thread records, every `interval` seconds, how many cores the rest of
the machine kept busy (total busy CPU from /proc/stat minus the server's and
our own), plus the server's resident memory.
"""

from __future__ import annotations

import dataclasses
import os
import pathlib
import threading
import time

TICKS = os.sysconf("SC_CLK_TCK")
NCPU = os.cpu_count() or 1


def machine_busy_seconds() -> float:
    """CPU seconds all CPUs spent busy since boot (everything but idle and iowait).
    guest time is already part of user time, so it is not added again."""
    with open("/proc/stat") as f:
        fields = f.readline().split()
    user, nice, system, idle, iowait, irq, softirq, steal = (int(v) for v in fields[1:9])
    return (user + nice + system + irq + softirq + steal) / TICKS


def process_cpu_seconds(pid: int | str = "self") -> float:
    """user + system CPU seconds of a process (all its threads) so far."""
    stat = pathlib.Path(f"/proc/{pid}/stat").read_text()
    fields = stat.rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / TICKS


def memory_status(pid: int) -> dict[str, int]:
    """VmRSS, VmHWM, RssAnon, RssFile in bytes (absent keys are left out)."""
    out: dict[str, int] = {}
    for line in pathlib.Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in ("VmRSS", "VmHWM", "RssAnon", "RssFile", "RssShmem"):
            out[key] = int(value.split()[0]) * 1024
    return out


def reset_peak_rss(pid: int) -> bool:
    """Reset VmHWM to the current RSS (Linux >= 4.0, needs ptrace-level access:
    our own child as the same user or root). True on success."""
    try:
        pathlib.Path(f"/proc/{pid}/clear_refs").write_text("5")
        return True
    except OSError:
        return False


@dataclasses.dataclass
class Snapshot:
    wall: float
    machine_busy: float
    server_cpu: float
    self_cpu: float


def snapshot(server_pid: int) -> Snapshot:
    return Snapshot(time.monotonic(), machine_busy_seconds(), process_cpu_seconds(server_pid), process_cpu_seconds())


class Sampler:
    """Samples the server's memory and the machine's CPU in a background thread
    while a load level runs. Use as a context manager; read `result()` after."""

    def __init__(self, server_pid: int, interval: float = 0.25) -> None:
        self.pid = server_pid
        self.interval = interval
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="bench-sampler", daemon=True)
        self.rss_peak = 0
        self.rss_anon_peak = 0
        self.others_cores: list[float] = []  # per interval: cores busy outside server + load generator
        self.server_cores: list[float] = []
        self.hwm_reset = False
        self.start: Snapshot | None = None
        self.end: Snapshot | None = None
        self.rss_start = 0
        self.hwm_before = 0

    def __enter__(self) -> Sampler:
        mem = memory_status(self.pid)
        self.hwm_before = mem.get("VmHWM", 0)
        self.hwm_reset = reset_peak_rss(self.pid)
        self.rss_start = mem.get("VmRSS", 0)
        self.start = snapshot(self.pid)
        self._thread.start()
        return self

    def _sample_memory(self) -> None:
        mem = memory_status(self.pid)
        self.rss_peak = max(self.rss_peak, mem.get("VmRSS", 0))
        self.rss_anon_peak = max(self.rss_anon_peak, mem.get("RssAnon", 0))

    def _run(self) -> None:
        previous = self.start
        while not self._stop.wait(self.interval):
            try:
                self._sample_memory()
                now = snapshot(self.pid)
            except (OSError, ValueError, IndexError):
                return  # the server went away; the level fails elsewhere
            dt = now.wall - previous.wall
            if dt > 0:
                server = now.server_cpu - previous.server_cpu
                mine = now.self_cpu - previous.self_cpu
                others = now.machine_busy - previous.machine_busy - server - mine
                self.server_cores.append(server / dt)
                self.others_cores.append(max(0.0, others) / dt)
            previous = now

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        try:
            self._sample_memory()
            self.end = snapshot(self.pid)
            self.hwm_after = memory_status(self.pid).get("VmHWM", 0)
        except OSError:
            self.end = None
            self.hwm_after = 0

    def result(self) -> dict:
        start, end = self.start, self.end
        if start is None or end is None:
            return {"error": "server process vanished during the level"}
        wall = end.wall - start.wall
        server = end.server_cpu - start.server_cpu
        mine = end.self_cpu - start.self_cpu
        machine = end.machine_busy - start.machine_busy
        others = max(0.0, machine - server - mine)
        return {
            "wall_seconds": wall,
            "ncpu": NCPU,
            "server_cpu_seconds": server,
            "server_cores_mean": server / wall if wall > 0 else None,
            "loadgen_cpu_seconds": mine,
            "machine_busy_cpu_seconds": machine,
            "others_cpu_seconds": others,
            "others_cores_mean": others / wall if wall > 0 else None,
            "others_cores_max_interval": max(self.others_cores, default=0.0),
            "sample_interval_seconds": self.interval,
            # The figure to compare: the exact level peak when VmHWM could be reset,
            # else the highest sampled VmRSS.
            "server_rss_peak_bytes": max(self.rss_peak, self.hwm_after if self.hwm_reset else 0),
            "server_rss_start_bytes": self.rss_start,
            "server_rss_peak_sampled_bytes": self.rss_peak,
            "server_rss_anon_peak_sampled_bytes": self.rss_anon_peak,
            # VmHWM reset at level start: the exact peak during the level.
            "server_vmhwm_level_bytes": self.hwm_after if self.hwm_reset else None,
            # VmHWM before the reset: peak since the server started (load, quantization, warm-up).
            "server_vmhwm_since_start_bytes": self.hwm_before,
        }
