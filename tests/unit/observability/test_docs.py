"""The metric reference in the README is the generated one."""

from __future__ import annotations

import pathlib

from service.observability.metrics import metrics_table

DOCS = pathlib.Path(__file__).resolve().parents[3] / "README.md"


def test_every_metric_is_documented():
    assert metrics_table() in DOCS.read_text(), "stale: paste `python -m service.observability.metrics` into the docs"
