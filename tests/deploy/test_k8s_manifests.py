"""deploy/k8s stays equal to the chart: the committed base is what the
generator makes from the chart's defaults, `kubectl kustomize` of the base
gives exactly the chart's objects, and the example overlay gives exactly the
chart rendered with the values it documents."""

from __future__ import annotations

import shutil

import pytest
from chart_render import REPO_ROOT, kustomize
from harness import load_script

K8S = REPO_ROOT / "deploy" / "k8s"


@pytest.fixture(scope="module")
def generator():
    return load_script(K8S / "generate.py")


def _key(doc: dict) -> tuple[str, str]:
    return doc["kind"], doc["metadata"]["name"]


def _sorted(docs: list[dict]) -> list[dict]:
    return sorted(docs, key=_key)


def test_committed_base_matches_a_fresh_generation(generator, tmp_path):
    fresh = tmp_path / "base"
    generator.generate(fresh)
    changes = generator.diff(fresh, K8S / "base")
    assert not changes, f"deploy/k8s/base is stale, run `make k8s-manifests`:\n{changes}"


def test_drift_is_detected(generator, tmp_path):
    """The check above can fail: a hand edit of the base shows up in the diff."""
    edited = tmp_path / "edited"
    shutil.copytree(K8S / "base", edited)
    path = edited / "deployment-qwen-grpc.yaml"
    path.write_text(path.read_text().replace("replicas: 2", "replicas: 5"))
    fresh = tmp_path / "fresh"
    generator.generate(fresh)
    assert "replicas: 5" in generator.diff(fresh, edited)


def test_kustomize_base_equals_the_chart_defaults(generator):
    chart = generator.normalize(generator.render_chart())
    built = kustomize(K8S / "base")
    assert [_key(d) for d in _sorted(built)] == [_key(d) for d in _sorted(chart)]
    assert _sorted(built) == _sorted(chart)


def test_example_overlay_equals_the_chart_with_its_values(generator):
    overlay = K8S / "overlays" / "example"
    chart = generator.normalize(generator.render_chart([overlay / "chart-values.yaml"], namespace="qwen"))
    for doc in chart:
        # helm install puts every object in the release namespace; kustomize writes it out.
        doc["metadata"]["namespace"] = "qwen"
    built = kustomize(overlay)
    assert _sorted(built) == _sorted(chart)
