"""Each test's report on its item (rep_setup / rep_call / rep_teardown), so
test_kind_e2e.diagnostics_on_failure knows whether to dump pods and events."""

from __future__ import annotations

import pytest


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    report = outcome.get_result()
    setattr(item, f"rep_{report.when}", report)
