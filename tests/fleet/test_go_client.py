"""The Go client (clients/go): built offline from Debian's Go packages, for
linux/amd64 and linux/arm64, run against the real Python server."""

from __future__ import annotations

import filecmp
import shutil
import subprocess

import pytest
from harness import REPO_ROOT, running_server

from qwen_grpc_client import QwenClient

GO_DIR = REPO_ROOT / "clients" / "go"
BINARIES = {"amd64": GO_DIR / "bin" / "qwen-chat-linux-amd64", "arm64": GO_DIR / "bin" / "qwen-chat-linux-arm64"}
ELF_MACHINE = {"amd64": 62, "arm64": 183}  # EM_X86_64, EM_AARCH64


def _make(target: str) -> None:
    result = subprocess.run(["make", "-C", str(GO_DIR), target], capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]


@pytest.fixture(scope="module")
def go_build():
    _make("build")  # installs the Debian packages first if missing
    return BINARIES


def test_go_vet_and_unit_tests(go_build):
    _make("test")


def test_binaries_are_static_linux_for_each_arch(go_build):
    for arch, path in go_build.items():
        header = path.read_bytes()[:64]
        assert header[:4] == b"\x7fELF", path
        assert int.from_bytes(header[18:20], "little") == ELF_MACHINE[arch], f"{path} is not {arch}"
        # A static binary has no program interpreter (PT_INTERP).
        assert b"ld-linux" not in path.read_bytes()[:4096], f"{path} is dynamically linked"


def test_committed_go_stubs_match_the_proto(go_build, tmp_path):
    if shutil.which("protoc") is None:
        pytest.fail("protoc missing although make build installs it")
    module = "github.com/qwen-grpc/qwen-grpc/clients/go"
    subprocess.run(
        [
            "protoc",
            f"-I{REPO_ROOT / 'proto'}",
            f"--go_out={tmp_path}",
            f"--go_opt=module={module}",
            f"--go-grpc_out={tmp_path}",
            f"--go-grpc_opt=module={module}",
            "qwen/qwen_service.proto",
        ],
        check=True,
        cwd=REPO_ROOT / "proto",
        timeout=60,
    )
    for name in ("qwen_service.pb.go", "qwen_service_grpc.pb.go"):
        assert filecmp.cmp(tmp_path / "qwenpb" / name, GO_DIR / "qwenpb" / name, shallow=False), (
            f"{name} is stale: make -C clients/go proto"
        )


def test_go_client_streams_the_same_answer_as_the_python_sdk(go_build, tiny_model_dir):
    with running_server(tiny_model_dir, "--threads", "1", "--replica-name", "go-test") as server:
        with QwenClient(server.target, timeout=30) as client:
            expected = client.chat([{"role": "user", "content": "Hello there"}], temperature=0, max_tokens=24)
        result = subprocess.run(
            [
                str(go_build["amd64"]),
                "-target",
                server.target,
                "-temperature",
                "0",
                "-max-tokens",
                "24",
                "-timeout",
                "30s",
                "-usage",
                "Hello there",
            ],
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert result.returncode == 0, result.stderr
        assert result.stdout == expected.content + "\n"
        assert "[finish=length prompt=" in result.stderr and "completion=24" in result.stderr
        assert "replica=go-test]" in result.stderr

        # The deadline is enforced: 1 ms cannot be met.
        late = subprocess.run(
            [str(go_build["amd64"]), "-target", server.target, "-timeout", "1ms", "Hello"],
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert late.returncode == 1
        assert "DeadlineExceeded" in late.stderr
