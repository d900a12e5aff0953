"""Generated non-chest images for the input gate's outlier exposure (model/inputgate.py): drawn from
random numbers, no file from anywhere.

Kinds (each a rough caricature, on purpose: the gate must learn "not a chest film", not these):
ct (ellipse phantoms in a round field of view, noise), mr (smooth blobs inside a head outline with
a ring), us (speckle in a fan-shaped sector), nm (low-count blobs), doc (lines of text-like marks on
paper), gui (panels and buttons), icon (a shape on a plain background), texture (noise octaves),
gradient. The evaluation negatives (stage `negatives`) are real images from packages: none is made
here, and none is seen by any fit.
"""
from __future__ import annotations

import numpy as np

KINDS = ("ct", "mr", "us", "nm", "doc", "gui", "icon", "texture", "gradient")


def _grid(s: int):
    y, x = np.mgrid[0:s, 0:s].astype(np.float32) / s - 0.5
    return x, y


def _blur(a: np.ndarray, k: int) -> np.ndarray:
    from PIL import Image, ImageFilter

    im = Image.fromarray(np.clip(a * 255, 0, 255).astype(np.uint8))
    return np.asarray(im.filter(ImageFilter.GaussianBlur(k)), np.float32) / 255


def _ellipse(x, y, cx, cy, ax, ay, th) -> np.ndarray:
    c, s = np.cos(th), np.sin(th)
    u, v = (x - cx) * c + (y - cy) * s, -(x - cx) * s + (y - cy) * c
    return (u / ax) ** 2 + (v / ay) ** 2 <= 1


def one(kind: str, rng: np.random.Generator, s: int) -> np.ndarray:
    x, y = _grid(s)
    a = np.zeros((s, s), np.float32)
    if kind == "ct":
        body = _ellipse(x, y, 0, 0, rng.uniform(0.3, 0.45), rng.uniform(0.25, 0.42), rng.uniform(-0.2, 0.2))
        a[body] = rng.uniform(0.35, 0.55)
        for _ in range(rng.integers(2, 7)):
            e = _ellipse(x, y, rng.uniform(-0.2, 0.2), rng.uniform(-0.2, 0.2), rng.uniform(0.03, 0.15),
                         rng.uniform(0.03, 0.15), rng.uniform(0, np.pi)) & body
            a[e] = rng.uniform(0.0, 1.0)
        if rng.random() < 0.6:
            ring = body & ~_ellipse(x, y, 0, 0, 0.9 * np.abs(x).max(), 0.9 * np.abs(y).max(), 0)
            a[ring] = 0.95
        a += rng.normal(0, rng.uniform(0.01, 0.06), a.shape)
        a *= (x ** 2 + y ** 2) <= 0.25
    elif kind == "mr":
        head = _ellipse(x, y, 0, 0, rng.uniform(0.3, 0.42), rng.uniform(0.35, 0.45), rng.uniform(-0.2, 0.2))
        field = _blur(rng.random((s, s)).astype(np.float32), int(rng.integers(3, 9)))
        a = np.where(head, 0.3 + 0.7 * (field - field.min()) / (np.ptp(field) + 1e-6), 0)
        inner = _ellipse(x, y, 0, 0, 0.88 * 0.42, 0.88 * 0.45, 0)
        a[head & ~inner] = rng.uniform(0.0, 0.9)
        a += np.abs(rng.normal(0, 0.03, a.shape))
    elif kind == "us":
        r, th = np.sqrt(x ** 2 + (y + 0.5) ** 2), np.arctan2(x, y + 0.5)
        sector = (np.abs(th) < rng.uniform(0.4, 0.8)) & (r > 0.05) & (r < 0.95)
        speckle = rng.rayleigh(0.3, (s, s)).astype(np.float32)
        a = np.where(sector, _blur(speckle, 1) * np.exp(-r * rng.uniform(0.5, 2.0)), 0)
        for _ in range(rng.integers(0, 4)):
            a[np.abs(r - rng.uniform(0.2, 0.9)) < 0.01] *= 3
    elif kind == "nm":
        for _ in range(rng.integers(1, 6)):
            e = _ellipse(x, y, rng.uniform(-0.3, 0.3), rng.uniform(-0.3, 0.3), rng.uniform(0.05, 0.3),
                         rng.uniform(0.05, 0.3), rng.uniform(0, np.pi))
            a[e] += rng.uniform(0.2, 1.0)
        a = rng.poisson(_blur(a / (a.max() + 1e-6), 4) * rng.uniform(5, 40)).astype(np.float32)
        a = a / (a.max() + 1e-6)
        if rng.random() < 0.5:
            a = 1 - a
    elif kind == "doc":
        a[:] = rng.uniform(0.85, 1.0)
        for row in range(int(rng.integers(8, 30))):
            yy = int(s * (0.05 + row * rng.uniform(0.02, 0.04)))
            if yy >= s - 2:
                break
            xx = int(s * rng.uniform(0.05, 0.1))
            while xx < s * rng.uniform(0.6, 0.95):
                w = int(rng.integers(2, max(3, s // 20)))
                a[yy:yy + max(1, s // 60), xx:xx + w] = rng.uniform(0.0, 0.3)
                xx += w + int(rng.integers(1, 4))
    elif kind == "gui":
        a[:] = rng.uniform(0.5, 1.0)
        for _ in range(rng.integers(3, 15)):
            x0, y0 = rng.integers(0, s - 8, 2)
            x1, y1 = x0 + rng.integers(8, s // 2), y0 + rng.integers(4, s // 3)
            a[y0:y1, x0:x1] = rng.uniform(0, 1)
            a[y0:y1, x0] = a[y0, x0:x1] = rng.uniform(0, 0.4)
    elif kind == "icon":
        a[:] = rng.choice([0.0, 1.0, rng.uniform(0, 1)])
        shape = _ellipse(x, y, 0, 0, rng.uniform(0.15, 0.45), rng.uniform(0.15, 0.45), rng.uniform(0, np.pi))
        if rng.random() < 0.5:
            shape = (np.abs(x) < rng.uniform(0.1, 0.4)) & (np.abs(y) < rng.uniform(0.1, 0.4))
        a[shape] = rng.uniform(0, 1)
    elif kind == "texture":
        for octave in range(1, 6):
            n = max(2, s // (2 ** (6 - octave)))
            small = rng.random((n, n)).astype(np.float32)
            from PIL import Image

            a += np.asarray(Image.fromarray((small * 255).astype(np.uint8)).resize((s, s), Image.BICUBIC),
                            np.float32) / 255 / octave
    else:  # gradient
        a = (x * rng.normal() + y * rng.normal() + rng.normal() * (x ** 2 + y ** 2))
    a = (a - a.min()) / (np.ptp(a) + 1e-6)
    return (a * 255).astype(np.uint8)


def generate(rng: np.random.Generator, n: int, size: int = 224) -> np.ndarray:
    """n generated non-chest films (uint8, size x size), kinds drawn evenly at random."""
    return np.stack([one(KINDS[int(rng.integers(len(KINDS)))], rng, size) for _ in range(n)])
