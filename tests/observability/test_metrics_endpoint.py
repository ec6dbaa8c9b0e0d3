"""The /metrics listener: a taken port stops the server at start-up with a
clear error instead of running without metrics."""

from __future__ import annotations

import socket

from harness import ServerProcess


def test_a_taken_metrics_port_is_a_startup_error(tiny_model_dir):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        server = ServerProcess(tiny_model_dir, "--metrics-port", str(port))
        try:
            assert server.process.wait(60) == 2
            assert f"cannot start: cannot serve metrics on 127.0.0.1:{port}" in server.log
        finally:
            server.close()
