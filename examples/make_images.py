"""Regenerate the sample images in examples/images/ (all drawn here, none downloaded).

python examples/make_images.py
"""

from __future__ import annotations

import math
from pathlib import Path

from PIL import Image, ImageDraw

HERE = Path(__file__).resolve().parent / "images"


def landscape(width: int = 960, height: int = 640) -> Image.Image:
    """A sky-and-hills picture with a sun: smooth gradients and edges, like a photo."""
    image = Image.new("RGB", (width, height))
    draw = ImageDraw.Draw(image)
    for y in range(height):
        t = y / height
        draw.line([(0, y), (width, y)], fill=(int(70 + 120 * t), int(130 + 80 * t), int(220 - 40 * t)))
    draw.ellipse([width * 0.7, height * 0.12, width * 0.82, height * 0.3], fill=(255, 220, 120))
    for layer, colour in enumerate([(60, 120, 60), (40, 95, 45), (25, 70, 35)]):
        base = height * (0.55 + 0.12 * layer)
        points = [(0, height)]
        for x in range(0, width + 8, 8):
            points.append((x, base - 40 * math.sin(x / (90 + 30 * layer) + layer) - 20 * math.sin(x / 37)))
        points.append((width, height))
        draw.polygon(points, fill=colour)
    return image


def logo(size: int = 256) -> Image.Image:
    """A shield with transparency (RGBA PNG)."""
    image = Image.new("RGBA", (size, size), (0, 0, 0, 0))
    draw = ImageDraw.Draw(image)
    s = size
    draw.polygon(
        [
            (s * 0.5, s * 0.06),
            (s * 0.9, s * 0.2),
            (s * 0.82, s * 0.66),
            (s * 0.5, s * 0.94),
            (s * 0.18, s * 0.66),
            (s * 0.1, s * 0.2),
        ],
        fill=(32, 96, 200, 255),
    )
    draw.line(
        [(s * 0.32, s * 0.5), (s * 0.46, s * 0.64), (s * 0.7, s * 0.36)],
        fill=(255, 255, 255, 255),
        width=max(4, s // 16),
    )
    return image


def spinner(size: int = 96, frames: int = 8) -> list[Image.Image]:
    """An animated dot going round (GIF frames)."""
    out = []
    for i in range(frames):
        frame = Image.new("RGB", (size, size), (250, 250, 250))
        draw = ImageDraw.Draw(frame)
        angle = 2 * math.pi * i / frames
        cx, cy = size / 2 + size * 0.3 * math.cos(angle), size / 2 + size * 0.3 * math.sin(angle)
        r = size * 0.1
        draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=(220, 60, 60))
        out.append(frame.convert("P", palette=Image.Palette.ADAPTIVE, colors=16))
    return out


def main() -> None:
    HERE.mkdir(parents=True, exist_ok=True)
    landscape().save(HERE / "landscape.jpg", quality=82)
    logo().save(HERE / "logo.png")
    frames = spinner()
    frames[0].save(HERE / "spinner.gif", save_all=True, append_images=frames[1:], duration=80, loop=0)
    landscape(480, 320).save(HERE / "hills.webp", quality=80)
    print("wrote", ", ".join(sorted(p.name for p in HERE.iterdir())))


if __name__ == "__main__":
    main()
