"""Wall time from launch to health SERVING with the default settings, as a
user measures it: `python -m service.cli --model M` from a checkout, polled
over gRPC health. Cold = an empty --weight-cache-dir (the first start packs
and writes the cache), warm = the same folder again. Rounds alternate between
the checkouts given, so load changes hit all of them alike. Prints median and
range per (checkout, cache state), with the 1-minute load average.

    python bench/startup.py --repo /work/main --repo . --rounds 3
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import statistics
import subprocess
import sys
import tempfile
import time

REPO_ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT / "tests"))
sys.path.insert(0, str(REPO_ROOT))

from harness import free_port, health_status  # noqa: E402

from service.config import default_model_path  # noqa: E402


def time_to_serving(
    repo: pathlib.Path, model: str, cache_dir: pathlib.Path | None, timeout: float = 600
) -> tuple[float, float]:
    """(wall seconds, server CPU seconds) from launch to SERVING. CPU time
    depends much less on what else the machine runs."""
    port = free_port()
    argv = [
        sys.executable,
        "-m",
        "service.cli",
        "--model",
        model,
        "--host",
        "127.0.0.1",
        "--grpc-port",
        str(port),
        "--metrics-port",
        str(free_port()),
        "--http-port",
        str(free_port()),
    ]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(repo)}
    if cache_dir is not None:
        env["QWEN_WEIGHT_CACHE_DIR"] = str(cache_dir)
    started = time.monotonic()
    process = subprocess.Popen(argv, cwd=repo, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        while time.monotonic() - started < timeout:
            if process.poll() is not None:
                raise RuntimeError(f"server in {repo} exited with {process.returncode}")
            if health_status(f"127.0.0.1:{port}", timeout=0.5) == 1:  # SERVING
                wall = time.monotonic() - started
                fields = pathlib.Path(f"/proc/{process.pid}/stat").read_text().rsplit(")", 1)[1].split()
                return wall, (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
            time.sleep(0.05)
        raise TimeoutError(f"not SERVING after {timeout} s")
    finally:
        process.terminate()
        try:
            process.wait(30)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repo", action="append", type=pathlib.Path, help="checkout to run (repeatable)")
    parser.add_argument("--model", default=default_model_path())
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--out", type=pathlib.Path, help="write the samples as JSON here too")
    args = parser.parse_args()
    repos = [repo.resolve() for repo in args.repo or [REPO_ROOT]]
    samples: dict[str, list[tuple[float, float]]] = {}
    loads = []
    for _ in range(args.rounds):
        for repo in repos:
            with tempfile.TemporaryDirectory(prefix="qwen-packed-") as cache:
                # A checkout without the cache ignores the variable: its cold and warm are the same path.
                for state in ("cold", "warm"):
                    loads.append(os.getloadavg()[0])
                    wall, cpu = time_to_serving(repo, args.model, pathlib.Path(cache))
                    samples.setdefault(f"{repo} {state}", []).append((wall, cpu))
                    print(f"{repo} {state}: {wall:.2f} s wall, {cpu:.2f} s CPU (load {loads[-1]:.1f})", flush=True)
    print(f"\n1-min load average during the runs: {min(loads):.1f}-{max(loads):.1f}")
    print("| checkout | cache | wall median s (range) | CPU median s (range) | runs |\n|---|---|---|---|---|")
    for name, values in samples.items():
        repo, state = name.rsplit(" ", 1)
        cells = []
        for series in zip(*values):
            cells.append(f"{statistics.median(series):.2f} ({min(series):.2f}-{max(series):.2f})")
        print(f"| {repo} | {state} | {cells[0]} | {cells[1]} | {len(values)} |")
    if args.out:
        args.out.write_text(json.dumps({"samples": samples, "load_1min": loads}, indent=1))


if __name__ == "__main__":
    main()
