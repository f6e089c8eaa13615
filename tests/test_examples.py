"""The examples run and serve what their docstrings promise."""

from __future__ import annotations

import httpx
import pytest

from imageguard import Settings
from tests.support import SECRET, reopen

pytestmark = pytest.mark.anyio


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


async def test_fastapi_example_signed_thumbnails() -> None:
    from examples.fastapi_app import create_app

    app = create_app(Settings(secret_key=SECRET))
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t") as client:
        urls = (await client.get("/thumbnails", params={"width": 100})).json()
        assert set(urls) == {"hills.webp", "landscape.jpg", "logo.png", "spinner.gif"}
        response = await client.get(urls["landscape.jpg"])
        assert response.headers["content-type"] == "image/webp"
        assert reopen(response.content).size[0] == 100
        tampered = await client.get(urls["landscape.jpg"].replace("w=100", "w=2000"))
        assert tampered.status_code == 403


async def test_starlette_example_page() -> None:
    from examples.starlette_app import create_app

    app = create_app(Settings(secret_key=SECRET))
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t") as client:
        page = (await client.get("/")).text
        thumb = page.split('<img src="')[1].split('"')[0].replace("&amp;", "&")
        response = await client.get(thumb)
    assert response.status_code == 200 and response.headers["content-type"] == "image/webp"
