"""L2 (disk) and L3 (Redis) hits vs an L1 hit and vs a miss; the integrity check's cost.

Four ``ImageGuard`` instances wrap the same Flask upstream and are called in
process as WSGI callables: one answers from L1; one has L1 off and a disk tier
(every request is an L2 hit, verified); one has L1 off and Redis (every request
an L3 hit, verified, over loopback to a real ``redis-server`` this script
starts); one has no tier at all (every request is a miss: the upstream call and
the re-encode of a 640x480 JPEG). Calls alternate in short blocks and each
ratio is the median of the per-block ratios.

The integrity rows compare reading an entry and checking its tag (HMAC-SHA256
over key, header and body) with the plain read alone: a file read for L2, a
``GET`` for L3. Run: ``python benchmarks/bench_tiers.py`` (needs Debian's
``redis-server``; the Redis rows are skipped without it).
"""

from __future__ import annotations

import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from flask import Flask, Response

# Run as a script (python benchmarks/bench_x.py): make the repo root importable.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.bench_hit import _environ, _photo
from imageguard import ImageGuard, Settings
from imageguard.cache.envelope import Sealer

SECRET = "benchmark-secret-key-0123456789"
BLOCKS = 21
CALLS = 50


def _start_response(status: str, headers: list[tuple[str, str]], exc_info: Any = None) -> None:
    assert status.startswith("200"), status


def _caller(app: Callable[..., Iterable[bytes]], path: str) -> Callable[[], None]:
    environ = _environ(path)

    def call() -> None:
        body = app(dict(environ), _start_response)
        for _chunk in body:
            pass

    return call


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@contextmanager
def _redis() -> Iterator[str | None]:
    """A throwaway redis-server on loopback, or ``None`` when it is not installed."""
    binary = shutil.which("redis-server")
    if binary is None:
        yield None
        return
    port = _free_port()
    with tempfile.TemporaryDirectory() as workdir:
        process = subprocess.Popen(
            [binary, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"],
            cwd=workdir,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        try:
            deadline = time.monotonic() + 10
            while True:
                try:
                    socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
                    break
                except OSError:
                    if time.monotonic() > deadline:
                        raise
                    time.sleep(0.05)
            yield f"redis://127.0.0.1:{port}/0"
        finally:
            process.terminate()
            process.wait(10)


def _paired(
    baseline: Callable[[], None], candidate: Callable[[], None], blocks: int = BLOCKS, calls: int = CALLS
) -> tuple[float, float, float]:
    """(median baseline s, median candidate s, median per-block ratio), alternating blocks."""
    base: list[float] = []
    cand: list[float] = []
    for _ in range(blocks):
        for fn, out in ((baseline, base), (candidate, cand)):
            started = time.perf_counter()
            for _ in range(calls):
                fn()
            out.append((time.perf_counter() - started) / calls)
    ratio = statistics.median(c / b for c, b in zip(cand, base, strict=True))
    return statistics.median(base), statistics.median(cand), ratio


def _row(name: str, measured: tuple[float, float, float], target: str = "report") -> dict[str, object]:
    base, mine, ratio = measured
    return {"name": name, "baseline_s": base, "imageguard_s": mine, "ratio": ratio, "target": target}


def run() -> list[dict[str, object]]:
    """Measure; return one row per comparison."""
    photo = _photo()
    upstream = Flask("upstream")

    @upstream.route("/static/photo.jpg")
    def serve_photo() -> Response:
        return Response(photo, content_type="image/jpeg")

    rows: list[dict[str, object]] = []
    workdir = Path(tempfile.mkdtemp(prefix="imageguard-bench-"))
    try:
        with _redis() as redis_url:
            base = Settings(secret_key=SECRET, miss_rate="off")  # the "miss" side fills on every call
            l1 = ImageGuard(upstream.wsgi_app, settings=base)
            l2 = ImageGuard(
                upstream.wsgi_app, settings=base.replace(cache_bytes=0, disk_cache_dir=str(workdir / "l2"))
            )
            miss = ImageGuard(upstream.wsgi_app, settings=base.replace(cache_bytes=0))
            path = "/static/photo.jpg"
            l1_hit, l2_hit, a_miss = _caller(l1, path), _caller(l2, path), _caller(miss, path)
            l1_hit(), l2_hit(), a_miss()  # fill L1 and L2
            rows.append(_row("L2 hit (disk, verified) vs L1 hit", _paired(l1_hit, l2_hit)))
            rows.append(
                _row("L2 hit vs a miss (upstream + re-encode 640x480 JPEG)", _paired(a_miss, l2_hit, 7, 10))
            )
            l3: ImageGuard | None = None
            if redis_url is not None:
                l3 = ImageGuard(upstream.wsgi_app, settings=base.replace(cache_bytes=0, redis_url=redis_url))
                l3_hit = _caller(l3, path)
                l3_hit()
                rows.append(_row("L3 hit (Redis on loopback, verified) vs L1 hit", _paired(l1_hit, l3_hit)))
                rows.append(
                    _row(
                        "L3 hit vs a miss (upstream + re-encode 640x480 JPEG)", _paired(a_miss, l3_hit, 7, 10)
                    )
                )

            # The integrity check alone: read + open() vs the read.
            sealer = Sealer(SECRET)
            (entry_file,) = [p for p in (workdir / "l2" / "v1").rglob("*") if p.is_file()]
            key = entry_file.name

            def plain_read() -> None:
                with open(entry_file, "rb") as handle:
                    handle.read()

            def verified_read() -> None:
                with open(entry_file, "rb") as handle:
                    sealer.open(key, handle.read())

            rows.append(
                _row(
                    f"L2 read + integrity check vs plain file read ({entry_file.stat().st_size // 1024} KiB)",
                    _paired(plain_read, verified_read, BLOCKS, 200),
                )
            )
            if redis_url is not None and l3 is not None:
                import redis

                client = redis.Redis.from_url(redis_url)
                (name,) = list(client.scan_iter(match=b"imageguard:*:e:*"))
                redis_key = name.decode().rsplit(":", 1)[1]

                def plain_get() -> None:
                    client.get(name)

                def verified_get() -> None:
                    sealer.open(redis_key, client.get(name) or b"")

                rows.append(
                    _row(
                        "L3 GET + integrity check vs plain GET", _paired(plain_get, verified_get, BLOCKS, 200)
                    )
                )
                client.close()
                l3.close()
            l2.close()
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    return rows


if __name__ == "__main__":
    for row in run():
        base, mine = float(row["baseline_s"]), float(row["imageguard_s"])  # type: ignore[arg-type]
        print(
            f"{row['name']}: baseline {base * 1e6:.1f} us, imageguard {mine * 1e6:.1f} us, "
            f"ratio {float(row['ratio']):.2f}x ({row['target']})"  # type: ignore[arg-type]
        )
