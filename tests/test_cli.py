"""The command line, called as main([...]) and once as a real `imageguard serve` process."""

from __future__ import annotations

import http.client
import io
import json
import sys
from pathlib import Path

import pytest
from PIL import Image

from imageguard.cli import main
from tests.servers import ROOT, free_port, running
from tests.support import SECRET, jpeg, png


@pytest.fixture(autouse=True)
def clean_env(monkeypatch: pytest.MonkeyPatch) -> None:
    import os

    for name in list(os.environ):
        if name.startswith("IMAGEGUARD_"):
            monkeypatch.delenv(name)
    monkeypatch.setenv("IMAGEGUARD_SECRET_KEY", SECRET)


def test_keygen(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["keygen"]) == 0
    first = capsys.readouterr().out.strip()
    assert main(["keygen"]) == 0
    assert len(first) >= 40 and first != capsys.readouterr().out.strip()


def test_sign_matches_the_middleware(capsys: pytest.CaptureFixture[str]) -> None:
    from imageguard import Settings
    from imageguard.core import Core

    assert main(["sign", "/static/cat.jpg", "--w", "320", "--fmt", "webp"]) == 0
    url = capsys.readouterr().out.strip()
    assert url == Core(Settings(secret_key=SECRET)).url("/static/cat.jpg", w=320, fmt="webp")
    assert url.startswith("/static/cat.jpg?fmt=webp&w=320&s=")


def test_sign_refuses_without_a_key(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.delenv("IMAGEGUARD_SECRET_KEY")
    assert main(["sign", "/a.jpg", "--w", "3"]) == 2
    assert "IMAGEGUARD_SECRET_KEY" in capsys.readouterr().err


def test_config_redacts_and_reports_errors(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["config", "--json"]) == 0
    out = capsys.readouterr().out
    assert SECRET not in out
    assert json.loads(out)["max_bytes"] == 20 * 1024 * 1024
    monkeypatch.setenv("IMAGEGUARD_MAX_BYTES", "lots")
    assert main(["config"]) == 2
    assert "IMAGEGUARD_MAX_BYTES" in capsys.readouterr().err


def test_scan_writes_clean_copies_and_exits_1_on_rejection(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    good = tmp_path / "good.png"
    good.write_bytes(png(20, 10) + b"<script>alert(1)</script>")
    fake = tmp_path / "fake.jpg"
    fake.write_bytes(b"<html>not an image</html>")
    out = tmp_path / "clean"
    assert main(["scan", str(good), "--out", str(out)]) == 0
    clean = (out / "good.png").read_bytes()
    assert b"<script>" not in clean and Image.open(io.BytesIO(clean)).size == (20, 10)
    assert main(["scan", str(good), str(fake)]) == 1
    text = capsys.readouterr().out
    assert "REJECTED" in text and "not_image" in text and "1 clean, 1 rejected" in text


def test_scan_applies_transforms(tmp_path: Path) -> None:
    source = tmp_path / "photo.jpg"
    source.write_bytes(jpeg(400, 200))
    assert main(["scan", str(source), "--w", "100", "--fmt", "webp", "--out", str(tmp_path / "o")]) == 0
    assert Image.open(tmp_path / "o" / "photo.webp").size == (100, 50)


def test_scan_many_files_with_progress(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    files = []
    for i in range(8):
        path = tmp_path / f"{i}.png"
        path.write_bytes(png(8, 8))
        files.append(str(path))
    assert main(["scan", *files]) == 0
    assert "8 clean, 0 rejected" in capsys.readouterr().out


@pytest.mark.server
@pytest.mark.timeout(60)
def test_serve_runs_on_the_example_images() -> None:
    port = free_port()
    argv = [
        sys.executable,
        "-m",
        "imageguard.cli",
        "serve",
        str(ROOT / "examples" / "images"),
        "--port",
        str(port),
    ]
    with running(argv, port, env={"IMAGEGUARD_SECRET_KEY": SECRET}):
        connection = http.client.HTTPConnection("127.0.0.1", port, timeout=20)
        connection.request("GET", "/")
        page = connection.getresponse()
        html = page.read().decode()
        assert page.status == 200 and "landscape.jpg" in html
        thumb = html.split('src="')[1].split('"')[0].replace("&amp;", "&")
        connection.request("GET", thumb)
        response = connection.getresponse()
        body = response.read()
        assert response.status == 200
        assert Image.open(io.BytesIO(body)).size[0] == 320
        connection.request("GET", "/landscape.jpg?w=100")
        unsigned = connection.getresponse()
        unsigned.read()
        assert unsigned.status == 403
        connection.request("GET", "/../etc/passwd.png")
        traversal = connection.getresponse()
        traversal.read()
        assert traversal.status in (400, 404)
        connection.close()


# -- imageguard cache ---------------------------------------------------------------


def _fill_tiers(directory: Path, redis_url: str, names: list[str]) -> None:
    """Store one entry per name in L2 and L3, through a real guard as a server would."""
    from imageguard import ImageGuard, Settings
    from tests.support import Upstream

    upstream = Upstream()
    for name in names:
        upstream.add(name, png(20, 10), "image/png")
    app = upstream.app()
    guard = ImageGuard(
        app, settings=Settings(secret_key=SECRET, disk_cache_dir=str(directory), redis_url=redis_url)
    )
    client = app.test_client()
    for name in names:
        assert client.get(f"/static/{name}").status_code == 200
        assert client.get(f"/static/{name}").status_code == 200  # an L1 hit
    assert client.get(f"/static/{names[0]}?w=5").status_code == 403  # missing_signature
    assert guard.core is not None
    guard.core.flush_counters()  # what the listener thread does every ten seconds
    guard.close()


def test_cache_commands(
    tmp_path: Path, redis_url: str, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    directory = tmp_path / "l2"
    _fill_tiers(directory, redis_url, ["a.png", "b.png"])
    monkeypatch.setenv("IMAGEGUARD_DISK_CACHE_DIR", str(directory))
    monkeypatch.setenv("IMAGEGUARD_REDIS_URL", redis_url)

    assert main(["cache", "stats", "--json"]) == 0
    stats = json.loads(capsys.readouterr().out)
    assert stats["l2"]["entries"] == 2 and stats["l3"]["entries"] == 2
    fleet = stats["fleet"]  # every instance's counters, added up in Redis
    assert fleet["tiers"]["l1"] == {"hits": 2, "misses": 2, "hit_ratio": 0.5, "integrity_failures": 0}
    assert fleet["rejections"] == {"missing_signature": 1}
    assert main(["cache", "stats"]) == 0
    table = capsys.readouterr().out
    assert "50.0%" in table and "missing_signature" in table

    assert main(["cache", "verify"]) == 0
    assert "4 entries checked, 0 tampered" in capsys.readouterr().out

    # Tamper with one L2 file and one Redis value: verify names both and exits 1.
    files = sorted(p for p in (directory / "v1").rglob("*") if p.is_file())
    data = bytearray(files[0].read_bytes())
    data[-1] ^= 1
    files[0].write_bytes(bytes(data))
    import redis

    raw = redis.Redis.from_url(redis_url)
    name = next(iter(raw.scan_iter(match=b"imageguard:*:e:*")))
    raw.set(name, (raw.get(name) or b"")[:-10])
    assert main(["cache", "verify"]) == 1
    out = capsys.readouterr().out
    assert f"TAMPERED l2 {files[0].name}: bad_tag" in out
    assert f"TAMPERED l3 {name.decode().rsplit(':', 1)[1]}:" in out
    assert "4 entries checked, 2 tampered" in out

    assert main(["cache", "purge", "--path", "/static/a.png"]) == 0
    assert "purged 1 entry" in capsys.readouterr().out
    assert main(["cache", "purge", "--all"]) == 0
    assert "purged everything (generation 1)" in capsys.readouterr().out
    assert not [p for p in (directory / "v1").rglob("*") if p.is_file()]
    assert list(raw.scan_iter(match=b"imageguard:*:e:*")) == []
    assert int(raw.get(next(iter(raw.scan_iter(match=b"imageguard:*:gen")))) or 0) == 1
    raw.close()


def test_cache_commands_need_a_tier_and_a_key(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    assert main(["cache", "stats"]) == 2
    assert "no cache tier configured" in capsys.readouterr().err
    monkeypatch.setenv("IMAGEGUARD_DISK_CACHE_DIR", str(tmp_path / "l2"))
    monkeypatch.delenv("IMAGEGUARD_SECRET_KEY")
    assert main(["cache", "verify"]) == 2
    assert "IMAGEGUARD_SECRET_KEY is not set" in capsys.readouterr().err
    unsafe = tmp_path / "open"
    unsafe.mkdir(mode=0o777)
    unsafe.chmod(0o777)
    monkeypatch.setenv("IMAGEGUARD_SECRET_KEY", SECRET)
    monkeypatch.setenv("IMAGEGUARD_DISK_CACHE_DIR", str(unsafe))
    assert main(["cache", "stats"]) == 2
    assert "IMAGEGUARD_DISK_CACHE_DIR" in capsys.readouterr().err
