"""A real Prometheus (Debian's `prometheus` package, installed by `make
prometheus`) on loopback for tests: scrapes given targets every second,
evaluates given rule files, and answers PromQL through its HTTP API."""

from __future__ import annotations

import json
import pathlib
import shutil
import subprocess
import tempfile
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable

from harness import free_port


def require_binary(name: str) -> str:
    path = shutil.which(name)
    if path is None:
        raise RuntimeError(f"{name} is not installed: run `make prometheus` (apt package prometheus)")
    return path


class PromQLError(RuntimeError):
    pass


class PrometheusServer:
    def __init__(
        self,
        targets: list[str],
        *,
        job: str = "qwen-grpc",
        labels: dict[str, str] | None = None,
        rule_files: list[pathlib.Path] = (),
    ) -> None:
        binary = require_binary("prometheus")
        self.dir = pathlib.Path(tempfile.mkdtemp(prefix="qwen-prometheus-"))
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        config = {
            "global": {"scrape_interval": "1s", "scrape_timeout": "1s", "evaluation_interval": "1s"},
            "rule_files": [str(path) for path in rule_files],
            "scrape_configs": [
                {"job_name": job, "static_configs": [{"targets": targets, "labels": labels or {}}]},
            ],
        }
        config_file = self.dir / "prometheus.yml"
        config_file.write_text(json.dumps(config))  # JSON is YAML
        self._log = open(self.dir / "prometheus.log", "wb")
        self.process = subprocess.Popen(
            [
                binary,
                f"--config.file={config_file}",
                f"--storage.tsdb.path={self.dir / 'data'}",
                f"--web.listen-address=127.0.0.1:{self.port}",
                "--log.level=warn",
            ],
            stdout=self._log,
            stderr=subprocess.STDOUT,
        )

    @property
    def log(self) -> str:
        return (self.dir / "prometheus.log").read_text(errors="replace")

    def _get(self, path: str, **params: object) -> dict:
        query = urllib.parse.urlencode({k: v for k, v in params.items() if v is not None})
        try:
            with urllib.request.urlopen(f"{self.url}{path}?{query}", timeout=10) as reply:
                body = json.load(reply)
        except urllib.error.HTTPError as exc:  # 400/422: a bad query, with Prometheus' reason
            body = json.load(exc)
        if body.get("status") != "success":
            raise PromQLError(f"{path} {params}: {body.get('errorType')}: {body.get('error')}")
        return body["data"]

    def wait_ready(self, timeout: float = 30.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"prometheus exited with {self.process.returncode}:\n{self.log}")
            try:
                with urllib.request.urlopen(f"{self.url}/-/ready", timeout=1) as reply:
                    if reply.status == 200:
                        return
            except OSError:
                pass
            time.sleep(0.1)
        raise TimeoutError(f"prometheus not ready after {timeout} s:\n{self.log}")

    def query(self, expr: str, at: float | None = None) -> list[dict]:
        """An instant query; returns the vector's samples (each {"metric", "value"})."""
        data = self._get("/api/v1/query", query=expr, time=at)
        if data["resultType"] == "scalar":
            return [{"metric": {}, "value": data["result"]}]
        return data["result"]

    def value(self, expr: str, at: float | None = None) -> float:
        """The value of a query that yields exactly one sample."""
        result = self.query(expr, at)
        if len(result) != 1:
            raise AssertionError(f"{expr}: expected one sample, got {result}")
        return float(result[0]["value"][1])

    def values(self, expr: str, label: str, at: float | None = None) -> dict[str, float]:
        """{label value: sample value} for a query whose samples differ by `label`."""
        return {sample["metric"].get(label, ""): float(sample["value"][1]) for sample in self.query(expr, at)}

    def wait_for(self, expr: str, check: Callable[[list[dict]], bool] = bool, timeout: float = 30.0) -> float:
        """Poll until check(query(expr)) holds; returns the evaluation time
        (Unix seconds) at which it did."""
        deadline = time.monotonic() + timeout
        last: list[dict] = []
        while time.monotonic() < deadline:
            at = time.time()
            last = self.query(expr, at)
            if check(last):
                return at
            time.sleep(0.25)
        raise TimeoutError(f"{expr} did not reach the expected state in {timeout} s; last: {last}")

    def rules(self) -> list[dict]:
        return [rule for group in self._get("/api/v1/rules")["groups"] for rule in group["rules"]]

    def alerts(self) -> list[dict]:
        return self._get("/api/v1/alerts")["alerts"]

    def close(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(15)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self._log.close()
        shutil.rmtree(self.dir, ignore_errors=True)
