"""qwen-serve: Settings -> gRPC and HTTP servers (health NOT_SERVING) ->
model load -> engine + warm-up -> SERVING; SIGTERM/SIGINT drain gracefully.
Both transports run in one event loop and share one ChatService/engine."""

from __future__ import annotations

import asyncio
import ctypes
import gc
import json
import logging
import os
import pathlib
import resource
import signal
import sys
import time
from collections.abc import Callable
from typing import TYPE_CHECKING

from .config import ConfigError, Settings, load_settings

if TYPE_CHECKING:
    from .api.http_server import HttpBackend, HttpServer
    from .chat import ChatService
    from .engine.engine import Engine
    from .engine.types import EngineStats
    from .observability.metrics import MetricsServer

_LOG = logging.getLogger("qwen_grpc")
# The time first: the native exit at a stop signal during the load writes it itself (_exit_at_signals_while_loading).
_LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"

ACCEPT_ERROR_MESSAGE = "socket.accept() out of system resource"


def raise_fd_limit() -> None:
    """Soft file-descriptor limit -> hard limit: every client connection
    holds one, and the soft default (often 1024) is far below what the
    process may use. --http-max-connections keeps HTTP to half of it."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft == hard:
        return
    try:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    except (ValueError, OSError) as exc:  # e.g. an unlimited hard limit the kernel caps lower
        _LOG.warning("cannot raise the file-descriptor limit from %d: %s", soft, exc)
        return
    _LOG.info("file-descriptor limit raised from %d to %d", soft, hard)


class ListenError(Exception):
    """A listener could not bind its port (taken, or the address is not available)."""


class AcceptErrorLog:
    """The event loop's exception handler, with failed accept()s summarised.

    When the process runs out of file descriptors, asyncio reports every
    failed accept() on a listening socket with a traceback, and its selector
    loop retries up to `backlog` times per readiness event: at the limit that
    was ~6,000 tracebacks (80 MB of log) a second. This logs one line per
    `interval` with the count instead; everything else goes to the default
    handler."""

    def __init__(self, interval: float = 10.0) -> None:
        self._interval = interval
        self._count = 0
        self._next_report = 0.0

    def __call__(self, loop: asyncio.AbstractEventLoop, context: dict) -> None:
        if context.get("message") != ACCEPT_ERROR_MESSAGE:
            loop.default_exception_handler(context)
            return
        self._count += 1
        now = time.monotonic()
        if now >= self._next_report:
            _LOG.warning(
                "accept() failed %d time(s) in the last %.0f s: %s (out of file descriptors? see --http-max-connections)",
                self._count,
                self._interval,
                context.get("exception"),
            )
            self._count = 0
            self._next_report = now + self._interval


def _write_port_file(path: str, ports: dict[str, int | None]) -> None:
    """Written whole, then renamed into place: a reader never sees half of it."""
    target = pathlib.Path(path)
    partial = target.with_name(target.name + ".partial")
    partial.write_text(json.dumps(ports))
    partial.replace(target)


def _release_freed_memory() -> None:
    """Loading and repacking the weights frees gigabytes in many medium-sized
    blocks, which glibc keeps in its (per-thread) arenas; hand them back so
    resident memory is what the engine holds (measured: -300 MB or more).

    Collect first: torch.ao's quantize_dynamic leaves every float Linear it
    replaced in a reference cycle (module -> qconfig -> closure -> module),
    1.5 GB of float32 weights for int8 that only the cyclic collector frees.
    Trimming before that frees nothing of it, and when the collector does
    run later, that memory stays in the arenas (measured: 2.36 -> 1.23 GB
    server RSS at idle)."""
    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except OSError:  # not glibc (e.g. musl): nothing to trim
        pass


async def _trim_when_idle(stats: Callable[[], EngineStats], interval: float = 5.0) -> None:
    """Return freed memory to the OS whenever the engine has gone idle after
    generating: a burst of requests leaves activations, logits and prompt
    buffers in glibc's arenas, which it does not give back on its own
    (measured: ~100 MB after 16 concurrent 1000-token prompts). Only when
    idle, as the trim holds each arena's lock while it walks it."""
    generated = stats().generated_tokens_total
    while True:
        await asyncio.sleep(interval)
        now = stats()
        if now.running or now.waiting or now.generated_tokens_total == generated:
            continue
        generated = now.generated_tokens_total
        await asyncio.to_thread(_release_freed_memory)


class Server:
    """One replica: the gRPC server, the HTTP server (unless --no-http) and
    the engine behind both."""

    def __init__(self, settings: Settings) -> None:
        from .api.grpc_server import QwenServicer, build_server
        from .api.interceptors import TelemetryInterceptor
        from .auth import ApiKeyAuth
        from .observability.metrics import Metrics
        from .observability.tracing import setup_tracing
        from .ratelimit import limiter_from_settings

        self.settings = settings
        self.metrics = Metrics()
        self.tracing = setup_tracing(version=_version())
        self.metrics_server: MetricsServer | None = None
        self._servicer = QwenServicer()
        telemetry = TelemetryInterceptor(self.metrics.grpc, self.tracing.tracer if self.tracing.enabled else None)
        # One key set and one rate limiter for both transports.
        auth = ApiKeyAuth.from_settings(settings)
        limiter = limiter_from_settings(settings)
        self._grpc, self._health, self.grpc_port = build_server(
            settings, self._servicer, telemetry, auth=auth, limiter=limiter
        )
        self._http: HttpServer | None = None
        self._http_backend: HttpBackend | None = None
        self.http_port: int | None = None
        if settings.http:
            from .api.http_access import http_middleware
            from .api.http_server import HttpBackend, HttpServer, create_app

            self._http_backend = HttpBackend()
            app = create_app(
                self._http_backend,
                middleware=http_middleware(settings, auth=auth, limiter=limiter),
                max_body_bytes=settings.max_request_bytes,
                cors_allowed_origins=settings.cors_allowed_origins,
            )
            self._http = HttpServer(settings, app)
            self.http_port = self._http.port
        self.engine: Engine | None = None
        self.chat: ChatService | None = None
        self._trimmer: asyncio.Task | None = None
        self._stop = asyncio.Event()

    async def start(self) -> None:
        from .api.grpc_server import set_serving
        from .chat import ChatService, served_model_names
        from .engine.config import EngineConfig
        from .engine.engine import Engine
        from .engine.loader import LoadedModel, load_model, model_name
        from .observability.metrics import MetricsServer
        from .observability.telemetry import Telemetry

        started = time.monotonic()
        s = self.settings
        if s.metrics_port:
            metrics_server = self.metrics_server = MetricsServer(self.metrics.registry, s.host, s.metrics_port)
            _LOG.info("metrics on http://%s:%d/metrics", s.host, metrics_server.port)
        await set_serving(self._health, False)
        await self._grpc.start()
        _LOG.info("gRPC listening on %s:%d (NOT_SERVING while the model loads)", s.host, self.grpc_port)
        if self._http is not None:
            try:
                await self._http.start()  # listen() may still find the port taken
            except OSError as exc:
                raise ListenError(f"cannot listen for HTTP on {s.host}:{self.http_port}: {exc}") from exc
            self._http.task.add_done_callback(self._http_ended)
            _LOG.info("HTTP listening on %s:%d (/health 503 while the model loads)", s.host, self.http_port)
        if s.port_file:
            metrics_port = self.metrics_server.port if self.metrics_server is not None else None
            _write_port_file(s.port_file, {"grpc": self.grpc_port, "http": self.http_port, "metrics": metrics_port})
        # The model's name is known before it loads: one bounded `model` label, the default served name.
        model_metrics = self.metrics.for_model(served_model_names(s, model_name(s.model))[0])

        def load(quantization: str) -> LoadedModel:  # on the engine's compute thread
            return load_model(s.model, s.dtype, quantization, s.weight_cache_dir)

        # The constructor waits for the compute thread to probe, load and repack.
        engine = self.engine = await asyncio.to_thread(
            Engine, load, EngineConfig.from_settings(s), observer=model_metrics
        )
        _release_freed_memory()
        model_metrics.track_engine(engine.setup, engine.stats, max_running=s.max_batch_size, max_waiting=s.max_waiting)
        engine.start()
        self._health.watch_engine(engine.stats)  # qwen.Liveness
        self._trimmer = asyncio.create_task(_trim_when_idle(engine.stats))
        chat = self.chat = ChatService(engine, s, Telemetry(model_metrics, self.tracing.tracer))
        self._servicer.attach(chat)
        if self._http_backend is not None:
            self._http_backend.chat = chat
        await engine.warmup(chat.default_sampling(max_tokens=4))
        await set_serving(self._health, True)
        if self._http_backend is not None:
            self._http_backend.serving = True
        _LOG.info(
            "SERVING %s as %s in %.1f s",
            s.model,
            ", ".join(chat.served_model_names),
            time.monotonic() - started,
        )

    def request_stop(self) -> None:
        self._stop.set()

    def _http_ended(self, task: asyncio.Task) -> None:
        if not task.cancelled() and task.exception() is not None:
            _LOG.error("HTTP server failed; stopping", exc_info=task.exception())
        if not self._stop.is_set():
            self.request_stop()

    async def wait_for_stop(self) -> None:
        await self._stop.wait()

    async def drain_and_stop(self) -> None:
        """NOT_SERVING first (so probes and balancers move away), refuse new
        calls with UNAVAILABLE, let running requests finish for up to
        drain_timeout, then stop."""
        _LOG.info("draining (up to %.0f s)", self.settings.drain_timeout)
        if self._trimmer is not None:
            self._trimmer.cancel()
        # Ends open Watch streams too, which would otherwise hold the
        # server's stop below for the whole drain timeout.
        await self._health.begin_drain()
        if self._http_backend is not None:
            self._http_backend.serving = False
        if self.chat is not None:
            self.chat.begin_drain()
        deadline = time.monotonic() + self.settings.drain_timeout
        idle = False
        while self.engine is not None and time.monotonic() < deadline:
            stats = self.engine.stats()
            if stats.running == 0 and stats.waiting == 0:
                idle = True
                break
            await asyncio.sleep(0.05)
        if self.engine is not None and not idle:
            # Whatever still runs is cancelled now (with a final message).
            await self.engine.shutdown()
        # Generation is over, but streams to slow clients may still be
        # delivering their last messages (HTTP/2 flow control holds them
        # back): they get the rest of the drain time, at least a second for
        # final messages and trailers.
        grace = max(1.0, deadline - time.monotonic())
        stops = [self._grpc.stop(grace=grace)]
        if self._http is not None:
            stops.append(self._http.stop(grace=grace))
        await asyncio.gather(*stops)
        if self.engine is not None and idle:
            await self.engine.shutdown()
        self.tracing.shutdown()  # flush buffered spans
        if self.metrics_server is not None:
            self.metrics_server.close()
        _LOG.info("stopped")


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("qwen-grpc")
    except PackageNotFoundError:
        return ""


async def _serve(settings: Settings) -> None:
    loop = asyncio.get_running_loop()
    loop.set_exception_handler(AcceptErrorLog())
    try:
        server = Server(settings)  # binds every listener; reads nothing of the model yet
    except OSError as exc:
        raise ListenError(str(exc)) from exc
    stop_signals = (signal.SIGTERM, signal.SIGINT)
    for signum in stop_signals:
        loop.add_signal_handler(signum, server.request_stop)
    exits_natively = _exit_at_signals_while_loading(stop_signals)
    start = asyncio.create_task(server.start())
    stop = asyncio.create_task(server.wait_for_stop())
    done, _ = await asyncio.wait({start, stop}, return_when=asyncio.FIRST_COMPLETED)
    if start not in done:
        _exit_during_load()
    if exits_natively:  # loaded: a stop signal drains from now on
        for signum in stop_signals:
            loop.add_signal_handler(signum, server.request_stop)
    try:
        start.result()  # a failed start (e.g. missing model) raises here
        await stop
    finally:
        await server.drain_and_stop()


_STOPPED_WHILE_LOADING = "stopped while loading the model"


def _exit_at_signals_while_loading(signals: tuple[int, ...]) -> bool:
    """A stop signal before the model is loaded ends the process at once (see
    _exit_during_load), from the signal handler of the native library where
    it is available: the load's tokenizer and llguidance calls hold the GIL
    for up to a second each, which the event loop would need several times
    over to get to _exit_during_load (a SIGTERM took 4.3 s on a busy CI
    machine). The handler writes _exit_during_load's log line itself, in
    _LOG_FORMAT (the native side puts the time in front), and exits 0.
    Whether the native handler took the signals."""
    from .engine import native

    line = ""
    if _LOG.isEnabledFor(logging.INFO):
        record = _LOG.makeRecord(_LOG.name, logging.INFO, __file__, 0, _STOPPED_WHILE_LOADING, (), None)
        line = logging.Formatter(_LOG_FORMAT.removeprefix("%(asctime)s")).format(record) + "\n"
    return native.exit_at_signals(signals, line)


def _exit_during_load() -> None:
    """SIGTERM/SIGINT before the model is loaded: nothing to drain (every
    call is refused until then), but the load cannot be interrupted (it is
    inside torch, tokenizers and llguidance calls, ~20 s), it holds the GIL
    much of the time (a graceful stop of the listeners took seconds), and the
    interpreter's exit would wait for it. So end the process now."""
    _LOG.info(_STOPPED_WHILE_LOADING)
    logging.shutdown()
    os._exit(0)


def main(argv: list[str] | None = None) -> int:
    try:
        settings = load_settings(argv)
    except ValueError as exc:  # pydantic's ValidationError: names the bad setting
        print(f"qwen-serve: invalid configuration: {exc}", file=sys.stderr)
        return 2
    logging.basicConfig(
        level=settings.log_level.upper(),
        format=_LOG_FORMAT,
        stream=sys.stderr,
    )
    from .observability import ObservabilityError

    raise_fd_limit()
    try:
        asyncio.run(_serve(settings))
    except ObservabilityError as exc:
        _LOG.error("cannot start: %s", exc)
        return 2
    except ConfigError as exc:  # keys file, TLS files
        _LOG.error("invalid configuration: %s", exc)
        return 2
    except ListenError as exc:
        _LOG.error("cannot start: %s", exc)
        return 2
    except (OSError, ValueError) as exc:  # a model that cannot be found or loaded
        _LOG.error("cannot start with --model %s: %s", settings.model, exc)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
