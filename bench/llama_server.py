"""llama.cpp's `llama-server`, the anchor of the comparison: find or build the
binary (cached outside git), and run it on the GGUF for one load level.

    python bench/llama_server.py build     # print the binary's path, building it if missing

The binary is not packaged for this machine. It is built from the llama.cpp
source vendored in the `llama-cpp-python` sdist on PyPI (pinned below), once,
into ~/.cache/qwen-grpc/llama/ (~8 min on 2 cores). A finished build found in
that cache (for instance one started by hand) is reused, and a build that is
still running there is waited for instead of starting a second one.
"""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import json
import os
import pathlib
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time
import urllib.error
import urllib.request

ROOT = pathlib.Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from service.config import default_cache_dir  # noqa: E402
from service.engine.cpu import cpu_flags  # noqa: E402

LLAMA_CPP_PYTHON_VERSION = os.environ.get("LLAMA_CPP_PYTHON_VERSION", "0.3.36")
CMAKE_FLAGS = [
    "-DCMAKE_BUILD_TYPE=Release",
    "-DLLAMA_BUILD_SERVER=ON",
    "-DLLAMA_CURL=OFF",
    "-DBUILD_SHARED_LIBS=OFF",
]
# On a CPU with AMX, -march=native builds ggml's AMX backend, and this llama.cpp's
# llama-server then dies of a segmentation fault in ggml_backend_amx_mul_mat at the
# first forward pass of this Q4_K_M model (2026-12-03, Intel Xeon with AMX-INT8). There
# it is built for the CPU's other instruction sets, named one by one (-march=native
# without AMX); everywhere else natively.
NATIVE_WITHOUT_AMX = {  # /proc/cpuinfo flag: ggml's option
    "sse4_2": "GGML_SSE42",
    "f16c": "GGML_F16C",
    "fma": "GGML_FMA",
    "bmi2": "GGML_BMI2",
    "avx": "GGML_AVX",
    "avx2": "GGML_AVX2",
    "avx_vnni": "GGML_AVX_VNNI",
    "avx512bw": "GGML_AVX512",
    "avx512vbmi": "GGML_AVX512_VBMI",
    "avx512_vnni": "GGML_AVX512_VNNI",
    "avx512_bf16": "GGML_AVX512_BF16",
}


def _without_amx() -> bool:
    return "amx_int8" in cpu_flags()


def cmake_flags() -> list[str]:
    if not _without_amx():
        return [*CMAKE_FLAGS, "-DGGML_NATIVE=ON"]
    flags = cpu_flags()
    return [
        *CMAKE_FLAGS,
        "-DGGML_NATIVE=OFF",
        *(f"-D{option}={'ON' if flag in flags else 'OFF'}" for flag, option in NATIVE_WITHOUT_AMX.items()),
    ]


def _variant() -> str:
    """Names the build directory and the cached binary: a native build and one
    without AMX never stand in for each other."""
    return "-no-amx" if _without_amx() else ""


def llama_cache_dir() -> pathlib.Path:
    return default_cache_dir() / "llama"


def cached_binary() -> pathlib.Path:
    return llama_cache_dir() / "bin" / f"llama-server{_variant()}"


def _build_dirs() -> list[pathlib.Path]:
    return sorted(llama_cache_dir().glob(f"llama_cpp_python-*/vendor/llama.cpp/build{_variant()}"))


def _works(binary: pathlib.Path) -> bool:
    if not (binary.is_file() and os.access(binary, os.X_OK)):
        return False
    try:
        run = subprocess.run([str(binary), "--version"], capture_output=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired):
        return False
    return run.returncode == 0


def _foreign_build_running(build_dir: pathlib.Path) -> bool:
    """A compiler, make or cmake process working in that build tree (someone's build)."""
    needle = str(build_dir.parent).encode()
    for proc in pathlib.Path("/proc").iterdir():
        if not proc.name.isdigit() or int(proc.name) == os.getpid():
            continue
        try:
            cmdline = (proc / "cmdline").read_bytes()
            cwd = str(os.readlink(proc / "cwd")).encode()
        except OSError:
            continue
        if not (needle in cmdline or cwd.startswith(needle)):
            continue
        name = pathlib.Path(cmdline.split(b"\0", 1)[0].decode(errors="replace")).name
        if name in ("cmake", "make", "gmake", "ninja", "cc1", "cc1plus", "c++", "g++", "gcc", "cc", "ld", "collect2"):
            return True
    return False


def _install(binary: pathlib.Path) -> pathlib.Path:
    target = cached_binary()
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_suffix(".tmp")
    shutil.copy2(binary, tmp)
    os.replace(tmp, target)
    (target.parent / f"{target.name}.source").write_text(str(binary) + "\n")
    return target


def find_binary() -> pathlib.Path | None:
    """The cached binary, or a finished build's binary (copied into the cache)."""
    if env := os.environ.get("LLAMA_SERVER"):
        return pathlib.Path(env) if _works(pathlib.Path(env)) else None
    if _works(cached_binary()):
        return cached_binary()
    for build in _build_dirs():
        candidate = build / "bin" / "llama-server"
        if not _foreign_build_running(build) and _works(candidate):
            return _install(candidate)
    return None


def _run(cmd: list[str], log: pathlib.Path, cwd: pathlib.Path | None = None) -> None:
    print("+", " ".join(cmd), f"(log: {log})", flush=True)
    with open(log, "ab") as out:
        rc = subprocess.call(cmd, cwd=cwd, stdout=out, stderr=subprocess.STDOUT)
    if rc != 0:
        tail = log.read_text(errors="replace").splitlines()[-30:]
        raise RuntimeError(f"{cmd[0]} failed with {rc}; last lines of {log}:\n" + "\n".join(tail))


def build_binary(jobs: int | None = None) -> pathlib.Path:
    """pip download the sdist, cmake vendor/llama.cpp, build llama-server, cache it."""
    cache = llama_cache_dir()
    cache.mkdir(parents=True, exist_ok=True)
    with open(cache / ".build.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # a second `make bench-llamacpp` waits here
        # Someone else's build in the cache: wait for it rather than compete for 2 cores.
        for build in _build_dirs():
            if _foreign_build_running(build):
                print(f"waiting for the llama-server build already running in {build} ...", flush=True)
                while _foreign_build_running(build):
                    time.sleep(10)
        if found := find_binary():
            return found
        name = f"llama_cpp_python-{LLAMA_CPP_PYTHON_VERSION}"
        sdist = cache / f"{name}.tar.gz"
        if not sdist.is_file():
            _run(
                [
                    sys.executable,
                    "-m",
                    "pip",
                    "download",
                    "--no-deps",
                    "--no-binary",
                    ":all:",
                    f"llama-cpp-python=={LLAMA_CPP_PYTHON_VERSION}",
                    "-d",
                    str(cache),
                ],
                cache / "dl.log",
            )
        source = cache / name
        if not (source / "vendor" / "llama.cpp" / "CMakeLists.txt").is_file():
            with tarfile.open(sdist) as tar:
                tar.extractall(cache, filter="data")
        llama_cpp = source / "vendor" / "llama.cpp"
        build = llama_cpp / f"build{_variant()}"
        _run(["cmake", "-S", str(llama_cpp), "-B", str(build), *cmake_flags()], cache / "cmake.log")
        jobs = jobs or len(os.sched_getaffinity(0))
        _run(["cmake", "--build", str(build), "--target", "llama-server", "-j", str(jobs)], cache / "build.log")
        binary = build / "bin" / "llama-server"
        if not _works(binary):
            raise RuntimeError(f"build finished but {binary} does not run")
        return _install(binary)


def ensure_binary() -> pathlib.Path:
    return find_binary() or build_binary()


def version(binary: pathlib.Path) -> str:
    run = subprocess.run([str(binary), "--version"], capture_output=True, text=True, timeout=30)
    return (run.stdout + run.stderr).strip()


class LlamaServerProcess:
    """llama-server on 127.0.0.1 with `parallel` slots of `ctx_per_slot` tokens each
    (-c is the total, split evenly between the slots), continuous batching on."""

    def __init__(
        self,
        binary: pathlib.Path,
        gguf: pathlib.Path,
        *,
        parallel: int,
        ctx_per_slot: int,
        threads: int,
        port: int,
        extra_args: list[str] = (),
    ) -> None:
        self.host = "127.0.0.1"
        self.port = port
        self._log = tempfile.NamedTemporaryFile(prefix="llama-server-", suffix=".log", delete=False)
        self.argv = [
            str(binary),
            "-m",
            str(gguf),
            "--host",
            self.host,
            "--port",
            str(port),
            "-t",
            str(threads),
            "-tb",
            str(threads),
            "-np",
            str(parallel),
            "-c",
            str(parallel * ctx_per_slot),
            "-cb",
            "--no-webui",
            *extra_args,
        ]
        self.started_at = time.monotonic()
        self.process = subprocess.Popen(self.argv, stdout=self._log, stderr=subprocess.STDOUT)

    @property
    def pid(self) -> int:
        return self.process.pid

    @property
    def log(self) -> str:
        return pathlib.Path(self._log.name).read_text(errors="replace")

    def wait_ready(self, timeout: float = 300.0) -> float:
        """Block until GET /health answers 200 (503 while the model loads)."""
        deadline = time.monotonic() + timeout
        url = f"http://{self.host}:{self.port}/health"
        opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))  # loopback: never via a proxy
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"llama-server exited with {self.process.returncode}:\n{self.log[-4000:]}")
            with contextlib.suppress(OSError, urllib.error.URLError, ValueError):
                with opener.open(url, timeout=1) as reply:
                    if reply.status == 200 and json.loads(reply.read() or b"{}").get("status", "ok") == "ok":
                        return time.monotonic() - self.started_at
            time.sleep(0.1)
        raise TimeoutError(f"llama-server not ready after {timeout} s:\n{self.log[-4000:]}")

    def close(self, timeout: float = 30.0) -> int:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        with contextlib.suppress(OSError):
            os.unlink(self._log.name)
        return self.process.returncode


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("command", choices=["build", "find"], help="build: find or build; find: only look")
    args = parser.parse_args(argv)
    binary = ensure_binary() if args.command == "build" else find_binary()
    if binary is None:
        print("llama-server not found (run: python bench/llama_server.py build)", file=sys.stderr)
        return 1
    print(binary)
    print(version(binary), file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
