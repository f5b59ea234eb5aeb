"""The organism's drawing vocabulary: named colours and shapes, and how a shape is drawn."""

from __future__ import annotations

import numpy as np

COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (220, 30, 30),
    "green": (40, 170, 50),
    "blue": (40, 70, 220),
    "yellow": (240, 220, 40),
    "purple": (140, 50, 180),
    "orange": (245, 140, 20),
    "pink": (250, 130, 190),
    "white": (245, 245, 245),
}
SHAPES = ("circle", "square", "triangle", "star", "cross", "diamond")


def shape_polygon(shape: str, cx: float, cy: float, r: float, angle: float) -> list[tuple[float, float]]:
    if shape == "square":
        pts = [
            (np.cos(angle + k * np.pi / 2 + np.pi / 4), np.sin(angle + k * np.pi / 2 + np.pi / 4))
            for k in range(4)
        ]
    elif shape == "diamond":
        pts = [(0.7 * np.cos(k * np.pi / 2), np.sin(k * np.pi / 2)) for k in range(4)]
    elif shape == "triangle":
        pts = [
            (np.cos(angle - np.pi / 2 + k * 2 * np.pi / 3), np.sin(angle - np.pi / 2 + k * 2 * np.pi / 3))
            for k in range(3)
        ]
    elif shape == "star":
        pts = [
            (
                (1.0 if k % 2 == 0 else 0.45) * np.cos(angle - np.pi / 2 + k * np.pi / 5),
                (1.0 if k % 2 == 0 else 0.45) * np.sin(angle - np.pi / 2 + k * np.pi / 5),
            )
            for k in range(10)
        ]
    elif shape == "cross":
        a, b = 1.0, 0.33
        base = [
            (-b, -a),
            (b, -a),
            (b, -b),
            (a, -b),
            (a, b),
            (b, b),
            (b, a),
            (-b, a),
            (-b, b),
            (-a, b),
            (-a, -b),
            (-b, -b),
        ]
        c, s = np.cos(angle), np.sin(angle)
        pts = [(x * c - y * s, x * s + y * c) for x, y in base]
    else:
        raise ValueError(f"unknown shape {shape!r} (expected one of {', '.join(SHAPES)})")
    return [(cx + r * x, cy + r * y) for x, y in pts]


def draw_shape(draw, shape: str, cx: float, cy: float, r: float, angle: float, colour) -> None:
    if shape == "circle":
        draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=colour)
    else:
        draw.polygon(shape_polygon(shape, cx, cy, r, angle), fill=colour)
