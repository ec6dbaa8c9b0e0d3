"""Assertions about client-side load balancing over a fleet of replicas,
shared by every test that runs a fleet (the kind end-to-end test, and the
multi-replica test over network namespaces), so "spread" and "no failed
calls" mean the same thing wherever they are checked."""

from __future__ import annotations

import collections
from collections.abc import Iterable

# Each replica must serve at least this share of the calls (60 calls over 3
# replicas: at least 12 each; a perfect round_robin gives 20).
MIN_SHARE = 0.2


def assert_spread(
    replicas_by_call: Iterable[str], expected_replicas: Iterable[str], min_share: float = MIN_SHARE
) -> None:
    """Every expected replica served at least min_share of the calls, and no
    call went anywhere else."""
    counts = collections.Counter(replicas_by_call)
    expected = set(expected_replicas)
    total = sum(counts.values())
    assert total > 0, "no calls recorded"
    unexpected = set(counts) - expected
    assert not unexpected, f"calls answered by unexpected replicas {unexpected}: {dict(counts)}"
    starved = {name: counts.get(name, 0) for name in expected if counts.get(name, 0) < min_share * total}
    assert not starved, f"replicas below {min_share:.0%} of {total} calls: {starved} (all: {dict(counts)})"


def assert_no_failures(outcomes: Iterable[tuple[str, str]]) -> None:
    """outcomes: (what, status) pairs, status "OK" or a gRPC status name."""
    failed = [(what, status) for what, status in outcomes if status != "OK"]
    assert not failed, f"{len(failed)} failed calls: {failed[:10]}"
