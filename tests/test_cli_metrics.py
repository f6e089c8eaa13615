"""`imageguard serve --metrics PORT`: Prometheus metrics beside the image server."""

from __future__ import annotations

import http.client
import io
import os
import socket
import sys
from pathlib import Path

import pytest
from PIL import Image
from prometheus_client.parser import text_string_to_metric_families

import imageguard.metrics
import imageguard.serve
from imageguard.cli import main
from tests.servers import free_port, running
from tests.support import SECRET, png


@pytest.fixture(autouse=True)
def clean_env(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in list(os.environ):
        if name.startswith("IMAGEGUARD_"):
            monkeypatch.delenv(name)
    monkeypatch.setenv("IMAGEGUARD_SECRET_KEY", SECRET)


@pytest.fixture
def images(tmp_path: Path) -> Path:
    (tmp_path / "cat.png").write_bytes(png(40, 30))
    return tmp_path


def get(port: int, path: str) -> tuple[int, bytes]:
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=20)
    try:
        connection.request("GET", path)
        response = connection.getresponse()
        return response.status, response.read()
    finally:
        connection.close()


@pytest.mark.server
def test_serve_exports_metrics(images: Path) -> None:
    port, metrics_port = free_port(), free_port()
    argv = [
        sys.executable,
        "-m",
        "imageguard.cli",
        "serve",
        str(images),
        "--port",
        str(port),
        "--metrics",
        str(metrics_port),
    ]
    with running(argv, port):
        for _ in range(2):  # a miss, then a hit
            status, body = get(port, "/cat.png")
            assert status == 200
            assert Image.open(io.BytesIO(body)).size == (40, 30)
        status, body = get(metrics_port, "/metrics")
    assert status == 200
    text = body.decode()
    # The collector exports the family (and its known outcomes at 0) whatever
    # the request path has counted so far.
    assert "# TYPE imageguard_requests_total counter" in text
    families = {family.name: family for family in text_string_to_metric_families(text)}
    outcomes = {s.labels["outcome"] for s in families["imageguard_requests"].samples}
    assert {"hit", "miss"} <= outcomes
    assert "imageguard_cache_hits" in families and "imageguard_sanitize_seconds" in families


def test_metrics_without_prometheus_client_is_a_usage_error(
    images: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setattr(imageguard.metrics, "AVAILABLE", False)
    monkeypatch.setattr(imageguard.serve, "serve", _must_not_serve)
    assert main(["serve", str(images), "--metrics", str(free_port())]) == 2
    assert "pip install 'imageguard[metrics]'" in capsys.readouterr().err


def test_metrics_port_in_use_is_a_usage_error(
    images: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setattr(imageguard.serve, "serve", _must_not_serve)
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        busy = taken.getsockname()[1]
        assert main(["serve", str(images), "--metrics", str(busy)]) == 2
    assert f"cannot serve metrics on 127.0.0.1:{busy}" in capsys.readouterr().err


def _must_not_serve(*args: object, **kwargs: object) -> None:
    raise AssertionError("serve() must not run after a --metrics error")
