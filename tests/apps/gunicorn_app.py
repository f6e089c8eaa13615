"""A guarded Flask app for the real-server tests: `gunicorn tests.apps.gunicorn_app:app`."""

from __future__ import annotations

from imageguard import ImageGuard, Settings
from tests.support import SECRET, Upstream, jpeg, png

HTML = b"<html><script>alert(1)</script></html>"

upstream = Upstream()
upstream.add("polyglot.png", png(40, 30) + HTML, "image/png")
upstream.add("slow.jpg", jpeg(640, 480), "image/jpeg")
upstream.add("fake.png", HTML, "image/png")
upstream.slow["slow.jpg"] = 0.5  # keeps the fill in flight while the other requests arrive

app = upstream.app()
guard = ImageGuard(app, settings=Settings(secret_key=SECRET))
