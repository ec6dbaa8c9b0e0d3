"""Running out of file descriptors: asyncio reports every failed accept()
with a traceback (hundreds per second); qwen-serve's loop exception handler
summarises them. A real listener in a subprocess with a 64-descriptor limit."""

from __future__ import annotations

import socket
import subprocess
import sys

from harness import REPO_ROOT

LISTENER = """
import asyncio, logging, resource, sys
from service.cli import AcceptErrorLog
logging.basicConfig(level="INFO", format="%(levelname)s %(message)s")
resource.setrlimit(resource.RLIMIT_NOFILE, (64, resource.getrlimit(resource.RLIMIT_NOFILE)[1]))

async def main():
    loop = asyncio.get_running_loop()
    if sys.argv[1] == "summarised":
        loop.set_exception_handler(AcceptErrorLog(interval=10.0))
    server = await loop.create_server(asyncio.Protocol, "127.0.0.1", 0, backlog=256)
    print(server.sockets[0].getsockname()[1], flush=True)
    await asyncio.sleep(3)

asyncio.run(main())
"""


def _accept_failure_lines(handler: str) -> int:
    process = subprocess.Popen(
        [sys.executable, "-c", LISTENER, handler],
        cwd=REPO_ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env={"PYTHONPATH": str(REPO_ROOT), "PATH": "/usr/bin:/bin"},
    )
    port = int(process.stdout.readline())
    clients = [socket.create_connection(("127.0.0.1", port)) for _ in range(120)]  # more than 64 descriptors
    try:
        _, stderr = process.communicate(timeout=30)
    finally:
        for client in clients:
            client.close()
    return sum("accept" in line for line in stderr.splitlines())


def test_accept_failures_are_summarised_not_logged_each():
    assert _accept_failure_lines("default") > 50  # asyncio alone: one traceback per failed accept()
    assert _accept_failure_lines("summarised") == 1  # one line per 10 s
