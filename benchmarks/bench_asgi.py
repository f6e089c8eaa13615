"""Throughput of L1 hits through uvicorn + ImageGuardMiddleware, measured with wrk.

Compared in the same run, alternating, against (a) the same Starlette app
returning the same bytes from memory and (b) Starlette ``StaticFiles`` serving
the same file; and the pass-through cost on a JSON route vs the bare app.
Everything listens on 127.0.0.1 only; each wrk run is bounded in time.

Needs ``wrk`` (``apt-get install wrk``). Run: ``python benchmarks/bench_asgi.py``.
"""

from __future__ import annotations

import os
import re
import shutil
import socket
import statistics
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
ROUNDS = 5
SECONDS = 4
CONNECTIONS = 32


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@dataclass
class Server:
    port: int
    pid: int

    def cpu_seconds(self) -> float:
        """User + system CPU time of the server process so far (Linux /proc)."""
        fields = Path(f"/proc/{self.pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


@contextmanager
def _uvicorn(app: str) -> Iterator[Server]:
    port = _free_port()
    process = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "uvicorn",
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            "--log-level",
            "error",
            "--no-access-log",
            f"benchmarks.asgi_apps:{app}",
        ],
        cwd=ROOT,
    )
    try:
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            try:
                with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                    break
            except OSError:
                time.sleep(0.1)
        yield Server(port, process.pid)
    finally:
        process.terminate()
        process.wait(10)


def _wrk(server: Server, path: str) -> tuple[float, float]:
    """(requests per second, server CPU seconds per request) over SECONDS seconds.

    CPU per request is the steadier number on a small shared machine, where wrk
    and the server compete for the same cores; non-2xx answers are refused.
    """
    cpu_before = server.cpu_seconds()
    out = subprocess.run(
        ["wrk", "-t1", f"-c{CONNECTIONS}", f"-d{SECONDS}s", f"http://127.0.0.1:{server.port}{path}"],
        capture_output=True,
        text=True,
        check=True,
        timeout=SECONDS + 30,
    ).stdout
    cpu = server.cpu_seconds() - cpu_before
    if "Non-2xx" in out:
        raise RuntimeError(f"non-2xx answers from {path}:\n{out}")
    rate = re.search(r"Requests/sec:\s+([0-9.]+)", out)
    count = re.search(r"([0-9]+) requests in", out)
    if not rate or not count:
        raise RuntimeError(out)
    return float(rate.group(1)), cpu / int(count.group(1))


def run() -> list[dict[str, object]]:
    """Measure; rows use seconds per request so ratios read like the other benchmarks."""
    if shutil.which("wrk") is None:
        print("wrk not found (apt-get install wrk): skipping the ASGI throughput benchmark")
        return []
    sides = ("memory", "memory-headers", "static", "hit", "json-bare", "json-guarded")
    rates: dict[str, list[float]] = {k: [] for k in sides}
    cpu: dict[str, list[float]] = {k: [] for k in sides}
    with _uvicorn("bare") as bare, _uvicorn("static") as static, _uvicorn("guarded") as guarded:
        _wrk(guarded, "/img/served.jpg")  # warm: fill L1 (and the interpreters)
        plan = [
            ("memory", bare, "/img/photo.jpg"),
            ("memory-headers", bare, "/img/headers.jpg"),
            ("static", static, "/img/served.jpg"),
            ("hit", guarded, "/img/served.jpg"),
            ("json-bare", bare, "/api/data"),
            ("json-guarded", guarded, "/api/data"),
        ]
        for _ in range(ROUNDS):  # alternate, so drift hits every side alike
            for side, server, path in plan:
                rate, per_request = _wrk(server, path)
                rates[side].append(rate)
                cpu[side].append(per_request)
    rps = {k: statistics.median(v) for k, v in rates.items()}
    cost = {k: statistics.median(v) for k, v in cpu.items()}

    def row(name: str, base: str, ours: str, target: str) -> dict[str, object]:
        return {
            "name": name,
            "baseline_s": cost[base],
            "imageguard_s": cost[ours],
            "ratio": cost[ours] / cost[base],
            "throughput": rps[ours] / rps[base],
            "target": target,
        }

    return [
        row("uvicorn L1 hit vs Starlette bytes from memory (CPU/req)", "memory", "hit", "<= 1.0x"),
        row("uvicorn L1 hit vs Starlette bytes + the same headers", "memory-headers", "hit", "<= 1.0x"),
        row("uvicorn L1 hit vs Starlette StaticFiles (CPU/req)", "static", "hit", "<= 0.77x (1.3x)"),
        row("uvicorn JSON pass-through vs bare app (CPU/req)", "json-bare", "json-guarded", "<= 1.05x"),
    ]


if __name__ == "__main__":
    for result in run():
        print(
            f"{result['name']:<56} baseline {float(result['baseline_s']) * 1e6:7.1f} us  imageguard "  # type: ignore[arg-type]
            f"{float(result['imageguard_s']) * 1e6:7.1f} us  ratio {float(result['ratio']):.2f}x  "  # type: ignore[arg-type]
            f"throughput {float(result['throughput']):.2f}x  (target {result['target']})"  # type: ignore[arg-type]
        )
