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
