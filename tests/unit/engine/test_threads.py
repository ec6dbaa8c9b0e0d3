"""The thread governor: fewer threads while the host keeps them off their
cores, a probe of one more now and then, and back up once a probe runs
unhindered."""

from __future__ import annotations

from service.engine.threads import CONTENDED, FIRST_PROBE_AFTER, LAST_PROBE_AFTER, WINDOW, ThreadGovernor

STEP = 0.02  # seconds: a decode pass of the real model
HINDERED, FREE = CONTENDED - 0.3, 0.98


def _run(governor: ThreadGovernor, passes: int, on_cpu: float) -> list[int]:
    """The thread count of each of `passes` passes, each reporting on_cpu."""
    counts = []
    for _ in range(passes):
        counts.append(governor.next_threads())
        governor.record(on_cpu, STEP)
    return counts


def test_unhindered_passes_keep_every_thread():
    governor = ThreadGovernor(2)
    assert _run(governor, 500, FREE) == [2] * 500


def test_one_hindered_pass_is_not_contention_but_a_run_of_them_drops_a_thread():
    governor = ThreadGovernor(4)
    _run(governor, 1, HINDERED)
    assert _run(governor, 10, FREE) == [4] * 10
    assert _run(governor, WINDOW, HINDERED) == [4] * WINDOW
    assert governor.threads == 3
    assert _run(governor, WINDOW, HINDERED) == [3] * WINDOW
    assert governor.threads == 2


def test_short_passes_are_not_counted():
    governor = ThreadGovernor(2)
    for _ in range(50):
        governor.next_threads()
        governor.record(HINDERED, STEP / 100)
    assert governor.threads == 2


def test_a_probe_that_runs_unhindered_brings_the_thread_back():
    governor = ThreadGovernor(2)
    _run(governor, WINDOW, HINDERED)
    assert governor.threads == 1
    counts = _run(governor, FIRST_PROBE_AFTER + 1, FREE)
    assert counts == [1] * FIRST_PROBE_AFTER + [2]  # the probe
    assert governor.threads == 2
    assert _run(governor, 100, FREE) == [2] * 100


def test_failed_probes_come_ever_more_rarely_up_to_a_bound():
    governor = ThreadGovernor(2)
    _run(governor, WINDOW, HINDERED)
    counts = _run(governor, 20_000, HINDERED)  # one thread stays hindered-looking too: only probes matter
    probes = [index for index, count in enumerate(counts) if count == 2]
    gaps = [later - earlier for earlier, later in zip(probes, probes[1:])]
    assert probes[0] == FIRST_PROBE_AFTER
    assert gaps[:3] == [2 * FIRST_PROBE_AFTER + 1, 4 * FIRST_PROBE_AFTER + 1, 8 * FIRST_PROBE_AFTER + 1]
    assert max(gaps) == LAST_PROBE_AFTER + 1
    assert governor.threads == 1


def test_one_thread_has_nothing_to_drop():
    governor = ThreadGovernor(1)
    assert _run(governor, 100, HINDERED) == [1] * 100
