"""Small, deterministic good and bad image files for tests (shared by data and service tests).

Every function writes one file and returns its Path. Good images look a little like a chest
film (bright frame, two darker lung fields, rib stripes, seed-dependent texture), so they pass
every `imagecheck` rule, and two different seeds are never near-duplicates of each other.
"""
from __future__ import annotations

import io
import os
import shutil
import struct
import zlib
from pathlib import Path

import numpy as np
from PIL import Image

# The team's shared folder: $COVID_CXR_SHARED, else beside the checkout (the rule of tests/conftest.py;
# recomputed here because `from conftest import ...` can pick up a sub-folder's conftest module).
SHARED = Path(os.environ.get("COVID_CXR_SHARED", Path(__file__).resolve().parents[1].parent / "shared")).resolve()
BATCH_001 = SHARED / "incoming" / "batch-001"
KAGGLE = "COVID-19_Radiography_Dataset"


def _size(size: int | tuple[int, int]) -> tuple[int, int]:
    return (size, size) if isinstance(size, int) else (int(size[0]), int(size[1]))


def xray_array(size: int | tuple[int, int] = 256, seed: int = 0) -> np.ndarray:
    """A (h, w) float array in [0, 1] that looks vaguely like a frontal chest film."""
    w, h = _size(size)
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:h, 0:w].astype(np.float32)
    y /= max(h - 1, 1)
    x /= max(w - 1, 1)
    img = 0.75 - 0.25 * (2 * x - 1) ** 2
    for cx in (0.3, 0.7):  # lung fields
        img -= 0.35 * np.exp(-(((x - cx) / 0.14) ** 2 + ((y - 0.45) / 0.25) ** 2))
    img += 0.05 * np.sin(2 * np.pi * (y * rng.uniform(7, 11) + rng.uniform(0, 1)))  # ribs
    coarse = rng.standard_normal((24, 24)).astype(np.float32)  # seed-specific mid-scale texture
    tex = np.asarray(Image.fromarray(coarse, mode="F").resize((w, h), Image.Resampling.BICUBIC))
    img += 0.06 * tex + 0.01 * rng.standard_normal((h, w))
    return np.clip(img, 0, 1)


def gray_array(size: int | tuple[int, int] = 256, seed: int = 0) -> np.ndarray:
    return (xray_array(size, seed) * 255 + 0.5).astype(np.uint8)


def png_gray(path: Path | str, size: int | tuple[int, int] = 256, seed: int = 0) -> Path:
    """A valid 8-bit greyscale PNG (mode L)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(gray_array(size, seed)).save(path, "PNG")
    return path


def png16(path: Path | str, size: int | tuple[int, int] = 256, seed: int = 0) -> Path:
    """A valid 16-bit greyscale PNG X-ray (Pillow mode I;16), 12-bit range like a DICOM export."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    a = (xray_array(size, seed) * 4095).astype(np.uint16)
    Image.fromarray(a).save(path, "PNG")
    return path


def jpeg_gray_rgb(path: Path | str, size: int | tuple[int, int] = 256, seed: int = 0, quality: int = 90) -> Path:
    """A greyscale film saved as an *RGB* JPEG (valid: an X-ray, not a colour picture)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(gray_array(size, seed)).convert("RGB").save(path, "JPEG", quality=quality)
    return path


def rgb_photo(path: Path | str, size: int | tuple[int, int] = 256, seed: int = 0) -> Path:
    """A colourful RGB picture (sky, grass, a red blob): plainly not an X-ray."""
    w, h = _size(size)
    rng = np.random.default_rng(seed)
    y = np.linspace(0, 1, h)[:, None] * np.ones((1, w))
    a = np.zeros((h, w, 3), np.float32)
    a[..., 0] = 60 + 40 * y
    a[..., 1] = 140 + 60 * (y > 0.6)
    a[..., 2] = 230 * (y <= 0.6) + 40
    yy, xx = np.mgrid[0:h, 0:w]
    blob = ((xx - w * 0.6) ** 2 + (yy - h * 0.4) ** 2) < (min(w, h) * 0.15) ** 2
    a[blob] = (220, 30, 30)
    a += rng.normal(0, 4, a.shape)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.clip(a, 0, 255).astype(np.uint8), "RGB").save(path, "PNG")
    return path


def blank(path: Path | str, size: int | tuple[int, int] = 256, value: int = 128) -> Path:
    """A constant grey PNG: decodes fine, but is not an X-ray."""
    w, h = _size(size)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("L", (w, h), value).save(path, "PNG")
    return path


def la_png(path: Path | str, size: int | tuple[int, int] = 256, seed: int = 0) -> Path:
    """A greyscale+alpha PNG (mode LA): an X-ray, but a pixel mode outside validate.modes."""
    g = Image.fromarray(gray_array(size, seed))
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.merge("LA", (g, Image.new("L", g.size, 255))).save(path, "PNG")
    return path


def truncated(path: Path | str, size: int | tuple[int, int] = 256, seed: int = 0, keep: float = 0.5) -> Path:
    """A PNG cut off part-way through its pixel data (the header still reads)."""
    buf = io.BytesIO()
    Image.fromarray(gray_array(size, seed)).save(buf, "PNG")
    data = buf.getvalue()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data[: max(64, int(len(data) * keep))])
    return path


def zero_bytes(path: Path | str) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"")
    return path


def text_file(path: Path | str, text: str = "patient notes: not an image\n") -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


def tiny(path: Path | str, size: int = 32, seed: int = 0) -> Path:
    """A valid greyscale PNG under the 64 px minimum side."""
    return png_gray(path, size, seed)


def wide(path: Path | str, width: int = 4200, height: int = 96, seed: int = 0) -> Path:
    """A valid PNG over the 4096 px maximum on one side, yet small in pixels (decodes cheaply)."""
    return png_gray(path, (width, height), seed)


def _chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)


def huge_dims(path: Path | str, width: int = 30000, height: int = 30000) -> Path:
    """A PNG whose header claims width x height (default 900 MP) over a few bytes of pixel data.

    Costs no memory to write; a safe decoder must refuse it from the header alone.
    """
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)  # 8-bit greyscale
    idat = zlib.compress(b"\x00" * 1024)
    data = b"\x89PNG\r\n\x1a\n" + _chunk(b"IHDR", ihdr) + _chunk(b"IDAT", idat) + _chunk(b"IEND", b"")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return path


def animated_gif(path: Path | str, size: int = 128, frames: int = 3) -> Path:
    ims = [Image.fromarray(gray_array(size, s)) for s in range(frames)]
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    ims[0].save(path, "GIF", save_all=True, append_images=ims[1:], duration=100, loop=0)
    return path


def tga(path: Path | str, size: int = 128, seed: int = 0) -> Path:
    """A valid image in a format the project does not accept (Targa)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(gray_array(size, seed)).save(path, "TGA")
    return path


def resaved(src: Path | str, path: Path | str, size: int = 299, fmt: str = "PNG") -> Path:
    """The same film re-exported at another size / format: a near-duplicate of `src`."""
    im = Image.open(src)
    im.load()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    im.resize((size, size), Image.Resampling.BILINEAR).save(path, fmt)
    return path


def recropped(
    src: Path | str, path: Path | str, crop: tuple[float, float, float, float] = (0.06, 0.03, 0.02, 0.10),
    size: int | None = None,
) -> Path:
    """The same film re-cropped: `crop` = the fraction cut off the (left, top, right, bottom) edge,
    then resized back to the original size (or `size`), as a re-published copy of a scan is."""
    im = Image.open(src)
    im.load()
    w, h = im.size
    l, t, r, b = crop
    box = (round(l * w), round(t * h), round(w - r * w), round(h - b * h))
    out = im.crop(box).resize((size, size) if size else (w, h), Image.Resampling.BICUBIC)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    out.save(path, "PNG")
    return path


def real_images(n_per_class: int = 2) -> dict[str, list[Path]]:
    """Up to n real batch-001 files per class folder (empty dict when the share is absent)."""
    out: dict[str, list[Path]] = {}
    if not BATCH_001.is_dir():
        return out
    for d in sorted(p for p in BATCH_001.iterdir() if p.is_dir()):
        out[d.name] = sorted(d.glob("*.png"))[:n_per_class]
    return out


def kaggle_dir(data: Path, cls: str) -> Path:
    """`data/COVID-19_Radiography_Dataset/<cls>/images/`, created."""
    d = Path(data) / KAGGLE / cls / "images"
    d.mkdir(parents=True, exist_ok=True)
    return d


def copy_real(real: dict[str, list[Path]], dst: Path | str, per_class: int = 1, layout: str = "flat") -> list[Path]:
    """Copy real files into dst as `<Class>/<file>` (flat) or the Kaggle layout."""
    out = []
    for cls, files in real.items():
        d = Path(dst) / cls if layout == "flat" else kaggle_dir(dst, cls)
        d.mkdir(parents=True, exist_ok=True)
        out += [Path(shutil.copy2(f, d / f.name)) for f in files[:per_class]]
    return out
