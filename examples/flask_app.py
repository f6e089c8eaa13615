"""A Flask app whose images are served through imageguard, with signed thumbnails.

    export IMAGEGUARD_SECRET_KEY=$(imageguard keygen)
    flask --app examples.flask_app run    # Flask finds create_app(); or: python -m examples.flask_app

Open http://127.0.0.1:5000/: the page shows thumbnails whose URLs carry a
signature (``image_url()`` in the template); change ``w`` in the address bar and
imageguard answers 403.
"""

from __future__ import annotations

from pathlib import Path

from flask import Flask, render_template_string

from imageguard import ImageGuard, Settings

IMAGES = Path(__file__).resolve().parent / "images"

PAGE = """<!doctype html>
<meta charset="utf-8"><title>imageguard + Flask</title>
<h1>Signed thumbnails</h1>
<ul style="display:flex;gap:1em;list-style:none">
{% for name in names %}
  <li><a href="{{ url_for('static', filename=name) }}">
    <img src="{{ image_url(url_for('static', filename=name), w=240, fmt='webp') }}"
         alt="{{ name }}" width="240"></a><br><code>{{ name }}</code></li>
{% endfor %}
</ul>
"""


def create_app(settings: Settings | None = None) -> Flask:
    """The demo app; *settings* default to the IMAGEGUARD_* environment."""
    app = Flask(__name__, static_folder=str(IMAGES), static_url_path="/static/images")

    @app.route("/")
    def index() -> str:
        names = sorted(p.name for p in IMAGES.iterdir() if p.suffix in {".jpg", ".png", ".gif", ".webp"})
        return render_template_string(PAGE, names=names)

    ImageGuard(app, settings=settings)  # wraps app.wsgi_app, registers image_url()
    return app


if __name__ == "__main__":
    create_app().run(host="127.0.0.1", port=5000)
