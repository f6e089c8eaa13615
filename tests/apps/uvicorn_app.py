"""A guarded Starlette app for the real-server tests: `uvicorn tests.apps.uvicorn_app:app`."""

from __future__ import annotations

from imageguard import ImageGuardMiddleware, Settings
from tests.support import SECRET, Upstream, jpeg, png, starlette_app

HTML = b"<html><script>alert(1)</script></html>"

upstream = Upstream()
upstream.add("polyglot.png", png(40, 30) + HTML, "image/png")
upstream.add("slow.jpg", jpeg(640, 480), "image/jpeg")
upstream.slow["slow.jpg"] = 0.5  # keeps the fill in flight while the other requests arrive

app = starlette_app(upstream)
app.add_middleware(ImageGuardMiddleware, settings=Settings(secret_key=SECRET))
