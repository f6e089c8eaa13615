"""Run a real ``redis-server`` on 127.0.0.1 for the L3 tests (bounded waits, always stopped).

Speaks just enough RESP over a plain socket (PING, FLUSHALL) that the
fixtures need no client library. Tests that take Redis away mid-run use
:func:`redis_server` directly, then :meth:`RedisServer.stop` and
:meth:`RedisServer.start` it again on the same port.
"""

from __future__ import annotations

import shutil
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from tests.servers import free_port

#: Seconds to wait for a started server to answer PING.
START_TIMEOUT = 10.0
#: Seconds to wait for a server to exit after SIGTERM before SIGKILL.
STOP_TIMEOUT = 5.0


def command(port: int, *args: str, timeout: float = 1.0) -> bytes:
    """Send one command to the server on *port*; the first line of its answer."""
    request = f"*{len(args)}\r\n".encode() + b"".join(
        f"${len(arg.encode())}\r\n{arg}\r\n".encode() for arg in args
    )
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as sock:
        sock.sendall(request)
        answer = b""
        while not answer.endswith(b"\r\n"):
            chunk = sock.recv(4096)
            if not chunk:
                break
            answer += chunk
    return answer.strip()


class RedisServer:
    """One ``redis-server`` process on a fixed port, in a private directory, persisting nothing."""

    def __init__(self, executable: str, port: int, directory: Path) -> None:
        self.executable = executable
        self.port = port
        self.directory = directory
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    @property
    def log(self) -> Path:
        return self.directory / "redis.log"

    def argv(self) -> list[str]:
        return [
            self.executable,
            "--port",
            str(self.port),
            "--bind",
            "127.0.0.1",
            "--save",
            "",
            "--appendonly",
            "no",
            "--dir",
            str(self.directory),
            "--daemonize",
            "no",
            "--protected-mode",
            "yes",
            "--loglevel",
            "warning",
        ]

    def start(self) -> None:
        """Start the server (again, on the same port) and wait until it answers PING."""
        if self.process is not None and self.process.poll() is None:
            return
        with self.log.open("ab") as log:
            self.process = subprocess.Popen(
                self.argv(), cwd=self.directory, stdout=log, stderr=subprocess.STDOUT
            )
        deadline = time.monotonic() + START_TIMEOUT
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(
                    f"redis-server exited with {self.process.returncode}: {self.log.read_text()[-2000:]}"
                )
            try:
                if command(self.port, "PING", timeout=0.5) == b"+PONG":
                    return
            except OSError:
                pass
            time.sleep(0.05)
        self.stop()
        raise TimeoutError(f"redis-server on 127.0.0.1:{self.port} did not answer PING in {START_TIMEOUT}s")

    def stop(self) -> None:
        """SIGTERM the server by PID, wait for it, SIGKILL it if it lingers."""
        process, self.process = self.process, None
        if process is None or process.poll() is not None:
            return
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(STOP_TIMEOUT)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(STOP_TIMEOUT)

    def flushall(self) -> None:
        """Empty every database."""
        answer = command(self.port, "FLUSHALL")
        if answer != b"+OK":
            raise RuntimeError(f"FLUSHALL answered {answer!r}")


@contextmanager
def redis_server(port: int | None = None) -> Iterator[RedisServer]:
    """A running ``redis-server`` on 127.0.0.1 (a free port unless *port* is given).

    Skips the test when ``redis-server`` is not installed.
    """
    executable = shutil.which("redis-server")
    if executable is None:
        pytest.skip("redis-server not installed: apt-get install redis-server")
    with tempfile.TemporaryDirectory(prefix="imageguard-redis-") as directory:
        server = RedisServer(executable, port or free_port(), Path(directory))
        try:
            server.start()
            yield server
        finally:
            server.stop()
