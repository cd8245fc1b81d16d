"""The loss curve a training run leaves in OUT/loss.png (PIL only, no plotting library)."""

from __future__ import annotations

from pathlib import Path

import numpy as np


def plot_losses(points: list[tuple[int, float]], path: str | Path, title: str = "training loss") -> None:
    """A small line plot (PNG) with PIL: loss against step, and a smoothed curve."""
    from PIL import Image, ImageDraw  # noqa: PLC0415

    w, h, ml, mr, mt, mb = 640, 360, 60, 20, 30, 40
    img = Image.new("RGB", (w, h), "white")
    d = ImageDraw.Draw(img)
    d.text((ml, 8), title, fill="black")
    if not points:
        img.save(path)
        return
    xs = np.array([p[0] for p in points], float)
    ys = np.array([p[1] for p in points], float)
    ok = np.isfinite(ys)
    xs, ys = xs[ok], ys[ok]
    if len(xs) == 0:
        img.save(path)
        return
    x0, x1 = xs.min(), max(xs.max(), xs.min() + 1)
    y0, y1 = min(0.0, ys.min()), ys.max() * 1.05 + 1e-9
    px = lambda x: ml + (x - x0) / (x1 - x0) * (w - ml - mr)  # noqa: E731
    py = lambda y: h - mb - (y - y0) / (y1 - y0) * (h - mt - mb)  # noqa: E731
    d.rectangle([ml, mt, w - mr, h - mb], outline="black")
    for k in range(5):
        yv = y0 + (y1 - y0) * k / 4
        d.line([ml - 4, py(yv), ml, py(yv)], fill="black")
        d.text((4, py(yv) - 6), f"{yv:.2f}", fill="black")
    for xv in step_ticks(x0, x1):
        d.line([px(xv), h - mb, px(xv), h - mb + 4], fill="black")
        d.text((px(xv) - 10, h - mb + 8), f"{xv}", fill="black")
    d.line(list(zip(map(px, xs), map(py, ys))), fill=(170, 190, 230), width=1) if len(xs) > 1 else None
    k = max(1, len(ys) // 50)
    smooth = np.convolve(ys, np.ones(k) / k, mode="valid")
    if len(smooth) > 1:
        d.line(list(zip(map(px, xs[k - 1:]), map(py, smooth))), fill=(20, 60, 180), width=2)
    d.text((w // 2 - 10, h - 16), "step", fill="black")
    img.save(path)


def step_ticks(first: float, last: float, n: int = 5) -> list[int]:
    """Up to `n` whole steps from `first` to `last`, evenly spread, each once: a tick stands at
    the step its label names (a short run gets 1 2 3 4, not 1 1 2 3 4 at fractional steps)."""
    return sorted({int(round(v)) for v in np.linspace(first, last, n)})
