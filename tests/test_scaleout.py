"""Two real server processes sharing one redis-server (and one disk directory).

Instance A is gunicorn serving a Flask app under ``ImageGuard``; instance B is
uvicorn serving a Starlette app under ``ImageGuardMiddleware``. Both read the
same image folder and are configured only by ``IMAGEGUARD_*`` variables, as a
deployment would be. The test changes an image by writing its file, purges on
one instance and watches the other.
"""

from __future__ import annotations

import http.client
import io
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path

import pytest
from PIL import Image

from imageguard.cache.disk import DiskCache
from imageguard.cache.envelope import Sealer
from imageguard.cache.redis import RedisCache
from tests.redis_server import redis_server
from tests.servers import free_port, gunicorn, running, uvicorn
from tests.support import SECRET, eventually, png

pytestmark = [pytest.mark.server, pytest.mark.timeout(180)]


@dataclass
class Instance:
    name: str
    port: int

    def get(self, target: str) -> tuple[int, dict[str, str], bytes]:
        connection = http.client.HTTPConnection("127.0.0.1", self.port, timeout=30)
        try:
            connection.request("GET", target)
            response = connection.getresponse()
            return response.status, {k.lower(): v for k, v in response.getheaders()}, response.read()
        finally:
            connection.close()

    def calls(self) -> int:
        return int(self.get("/_calls")[2])

    def colour(self, target: str) -> tuple[int, int, int]:
        status, headers, body = self.get(target)
        assert status == 200, (self.name, status, headers.get("x-imageguard-reason"))
        return Image.open(io.BytesIO(body)).convert("RGB").getpixel((1, 1))  # type: ignore[return-value]


@dataclass
class Fleet:
    a: Instance
    b: Instance
    images: Path
    disk: Path
    redis_url: str

    def write(self, name: str, colour: tuple[int, int, int]) -> None:
        (self.images / name).write_bytes(png(24, 16, colour=colour))


@pytest.fixture(scope="module")
def fleet(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Fleet]:
    images = tmp_path_factory.mktemp("images")
    disk = tmp_path_factory.mktemp("l2") / "cache"
    with ExitStack() as stack:
        server = stack.enter_context(redis_server())
        env = {
            "SCALEOUT_IMAGES": str(images),
            "IMAGEGUARD_SECRET_KEY": SECRET,
            "IMAGEGUARD_REDIS_URL": server.url,
            "IMAGEGUARD_DISK_CACHE_DIR": str(disk),
        }
        a_port, b_port = free_port(), free_port()
        stack.enter_context(running(gunicorn("tests.apps.scaleout_app:make_wsgi()", a_port), a_port, env))
        stack.enter_context(
            running(uvicorn("tests.apps.scaleout_app:make_asgi", b_port, factory=True), b_port, env)
        )
        yield Fleet(Instance("a", a_port), Instance("b", b_port), images, disk, server.url)


def test_a_fill_on_one_instance_is_a_hit_on_the_other(fleet: Fleet) -> None:
    fleet.write("shared.png", (255, 0, 0))
    before_a, before_b = fleet.a.calls(), fleet.b.calls()
    status, headers_a, body_a = fleet.a.get("/img/shared.png")
    assert status == 200
    status, headers_b, body_b = fleet.b.get("/img/shared.png")
    assert status == 200 and body_b == body_a and headers_b["etag"] == headers_a["etag"]
    assert fleet.a.calls() == before_a + 1
    assert fleet.b.calls() == before_b  # B never called its upstream: the shared tier answered


def test_purge_by_path_on_one_instance_reaches_the_other(fleet: Fleet) -> None:
    fleet.write("purged.png", (255, 0, 0))
    assert fleet.a.colour("/img/purged.png") == (255, 0, 0)
    assert fleet.b.colour("/img/purged.png") == (255, 0, 0)  # now in B's own L1 too
    fleet.write("purged.png", (0, 0, 255))
    assert fleet.b.colour("/img/purged.png") == (255, 0, 0)  # cached: the change is not seen yet
    assert fleet.a.get("/_purge?path=/img/purged.png")[0] == 200
    eventually(lambda: fleet.b.colour("/img/purged.png") == (0, 0, 255), timeout=15)
    assert fleet.a.colour("/img/purged.png") == (0, 0, 255)


def test_purge_all_on_one_instance_reaches_the_other(fleet: Fleet) -> None:
    fleet.write("everything.png", (255, 0, 0))
    assert fleet.b.colour("/img/everything.png") == (255, 0, 0)
    assert fleet.a.colour("/img/everything.png") == (255, 0, 0)
    fleet.write("everything.png", (0, 255, 0))
    assert fleet.b.get("/_purge?all=1")[0] == 200
    eventually(lambda: fleet.a.colour("/img/everything.png") == (0, 255, 0), timeout=15)
    assert fleet.b.colour("/img/everything.png") == (0, 255, 0)


def test_concurrent_fills_from_two_processes_leave_one_valid_entry(fleet: Fleet) -> None:
    for n in range(5):
        fleet.write(f"race{n}.png", (n * 40, 0, 0))
    targets = [(instance, f"/img/race{n}.png") for n in range(5) for instance in (fleet.a, fleet.b) * 4]
    with ThreadPoolExecutor(16) as pool:
        results = list(pool.map(lambda t: t[0].get(t[1]), targets))
    assert all(status == 200 for status, _, _ in results)
    for n in range(5):  # every answer for one image is the same bytes
        bodies = {
            body
            for (_, target), (_, _, body) in zip(targets, results, strict=True)
            if target == f"/img/race{n}.png"
        }
        assert len(bodies) == 1
    sealer = Sealer(SECRET)
    disk = DiskCache(fleet.disk, 1 << 30, 3600, sealer)
    shared = RedisCache(fleet.redis_url, 3600, sealer)
    try:
        for tier in (disk, shared):
            report = list(tier.verify())
            assert report and all(detail is None for _, detail in report), (tier.name, report)
        assert not [p for p in fleet.disk.rglob(".tmp-*")]  # no temp file left behind
    finally:
        shared.close()
        disk.close()
