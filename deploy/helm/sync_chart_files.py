"""Copy the single-source monitoring files into the Helm chart, which cannot
read outside its own folder:

    deploy/grafana/*.json             -> deploy/helm/qwen-grpc/files/grafana/
    deploy/prometheus/*.yaml          -> deploy/helm/qwen-grpc/files/prometheus/
                                         (rules files; not the *.test.yaml promtool tests)

`make chart-sync` runs it; tests/deploy/test_chart_files.py fails while the
copies differ from their sources (edit the sources, never the copies).

    python deploy/helm/sync_chart_files.py [--check]
"""

from __future__ import annotations

import argparse
import filecmp
import pathlib
import shutil
import sys

DEPLOY = pathlib.Path(__file__).resolve().parents[1]
CHART_FILES = DEPLOY / "helm" / "qwen-grpc" / "files"
# source folder -> (glob, folder in the chart)
SOURCES = {
    DEPLOY / "grafana": ("*.json", CHART_FILES / "grafana"),
    DEPLOY / "prometheus": ("*.yaml", CHART_FILES / "prometheus"),
}
# promtool unit tests live beside the rules they test; they are not rules.
NOT_COPIED_SUFFIX = ".test.yaml"


def _files(folder: pathlib.Path, pattern: str) -> dict[str, pathlib.Path]:
    if not folder.is_dir():
        return {}
    return {p.name: p for p in folder.glob(pattern) if not p.name.endswith(NOT_COPIED_SUFFIX)}


def differences() -> list[str]:
    """What a sync would change, as human-readable lines."""
    out = []
    for source_dir, (pattern, target_dir) in SOURCES.items():
        sources, copies = _files(source_dir, pattern), _files(target_dir, pattern)
        for name in sorted(sources.keys() - copies.keys()):
            out.append(f"missing in chart: {target_dir / name}")
        for name in sorted(copies.keys() - sources.keys()):
            out.append(f"no source for chart copy: {target_dir / name}")
        for name in sorted(sources.keys() & copies.keys()):
            if not filecmp.cmp(sources[name], copies[name], shallow=False):
                out.append(f"differs from {sources[name]}: {copies[name]}")
    return out


def sync() -> None:
    for source_dir, (pattern, target_dir) in SOURCES.items():
        sources = _files(source_dir, pattern).values()
        for stale in _files(target_dir, pattern).values():
            stale.unlink()
        if sources:
            target_dir.mkdir(parents=True, exist_ok=True)
        for path in sources:
            shutil.copy2(path, target_dir / path.name)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--check", action="store_true", help="only report differences (exit 1 if any)")
    args = parser.parse_args(argv)
    if args.check:
        problems = differences()
        print("\n".join(problems) or "chart files in sync")
        return 1 if problems else 0
    sync()
    return 0


if __name__ == "__main__":
    sys.exit(main())
