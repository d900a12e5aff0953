"""Service-specific upload files: formats a browser or a PACS export may send, and hostile ones.

Generic good/bad files (truncated, zero bytes, text, 16-bit PNG, header-only bomb) come from
tests/imgfactory.py; this module adds SVG, PDF, animated GIF, a real zlib decompression bomb,
an oversized upload, and the JPEG variants (CMYK, EXIF-rotated, progressive) and RGBA PNG.
"""
from __future__ import annotations

import io
import os
import struct
import zlib
from pathlib import Path

import numpy as np
from PIL import Image


def _save(im: Image.Image, path: Path, fmt: str, **kw) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    im.save(path, fmt, **kw)
    return path


def gray_of(src: Path) -> Image.Image:
    im = Image.open(src)
    im.load()
    return im.convert("L")


def svg(path: Path) -> Path:
    path.write_text('<?xml version="1.0"?>\n<svg xmlns="http://www.w3.org/2000/svg" width="256" height="256">'
                    '<rect width="256" height="256" fill="#888"/><circle cx="128" cy="128" r="60"/></svg>\n')
    return path


def pdf(path: Path) -> Path:
    """A minimal, valid one-page PDF."""
    objs = [b"<< /Type /Catalog /Pages 2 0 R >>", b"<< /Type /Pages /Kids [3 0 R] /Count 1 >>",
            b"<< /Type /Page /Parent 2 0 R /MediaBox [0 0 200 200] >>"]
    out = io.BytesIO()
    out.write(b"%PDF-1.4\n")
    offsets = []
    for i, o in enumerate(objs, 1):
        offsets.append(out.tell())
        out.write(b"%d 0 obj\n%s\nendobj\n" % (i, o))
    xref = out.tell()
    out.write(b"xref\n0 %d\n0000000000 65535 f \n" % (len(objs) + 1))
    for off in offsets:
        out.write(b"%010d 00000 n \n" % off)
    out.write(b"trailer\n<< /Size %d /Root 1 0 R >>\nstartxref\n%d\n%%%%EOF\n" % (len(objs) + 1, xref))
    path.write_bytes(out.getvalue())
    return path


def animated_gif(path: Path, src: Path, frames: int = 3) -> Path:
    g = gray_of(src).resize((128, 128))
    ims = [g.point(lambda v, k=k: min(255, v + 20 * k)) for k in range(frames)]
    return _save(ims[0], path, "GIF", save_all=True, append_images=ims[1:], duration=100, loop=0)


def _chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)


def zlib_bomb_png(path: Path, side: int = 12_000) -> Path:
    """A *complete, valid* 8-bit grey PNG of side x side zeros (144 MP by default, over the
    100 MP limit but under Pillow's own 179 MP bomb error): ~150 kB on disk, 144 MB decoded."""
    comp = zlib.compressobj(9)
    row = b"\x00" * (side + 1)  # filter byte + pixels
    parts = [comp.compress(row) for _ in range(side)]
    parts.append(comp.flush())
    idat = b"".join(parts)
    ihdr = struct.pack(">IIBBBBB", side, side, 8, 0, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + _chunk(b"IHDR", ihdr) + _chunk(b"IDAT", idat) + _chunk(b"IEND", b""))
    return path


def oversized(path: Path, mb: float = 21) -> Path:
    """Random bytes just over `mb` MiB (the default limit is 20 MiB)."""
    path.write_bytes(os.urandom(int(mb * 1024 * 1024) + 1))
    return path


def rgba_png(path: Path, src: Path) -> Path:
    g = gray_of(src)
    alpha = Image.new("L", g.size, 255)
    alpha.paste(0, (0, 0, 16, 16))  # a transparent corner
    return _save(Image.merge("RGBA", (g, g, g, alpha)), path, "PNG")


def cmyk_jpeg(path: Path, src: Path) -> Path:
    im = gray_of(src).convert("RGB").convert("CMYK")
    p = _save(im, path, "JPEG", quality=95)
    assert Image.open(p).mode == "CMYK"
    return p


def jpeg(path: Path, src: Path, quality: int = 95) -> Path:
    return _save(gray_of(src), path, "JPEG", quality=quality)


def exif_rotated_jpeg(path: Path, src: Path, quality: int = 95) -> Path:
    """Pixels stored rotated 90 degrees, with EXIF Orientation=6 so that viewers show it upright."""
    g = gray_of(src)
    stored = g.transpose(Image.Transpose.ROTATE_90)
    exif = Image.Exif()
    exif[0x0112] = 6
    return _save(stored, path, "JPEG", quality=quality, exif=exif.tobytes())


def progressive_jpeg(path: Path, src: Path, side: int = 1024) -> Path:
    im = gray_of(src).resize((side, side), Image.Resampling.BICUBIC).convert("RGB")
    p = _save(im, path, "JPEG", quality=90, progressive=True)
    assert Image.open(p).info.get("progressive") or Image.open(p).info.get("progression")
    return p


def ood_png(path: Path, side: int = 256, seed: int = 0) -> Path:
    """Not a chest X-ray at all: random noise."""
    a = np.random.default_rng(seed).integers(0, 256, (side, side), dtype=np.uint8)
    return _save(Image.fromarray(a), path, "PNG")


def corrupt_png(path: Path, side: int = 256, seed: int = 0) -> Path:
    """Valid signature, header and chunk CRCs, but the pixel stream is random bytes (not zlib)."""
    ihdr = struct.pack(">IIBBBBB", side, side, 8, 0, 0, 0, 0)
    idat = np.random.default_rng(seed).integers(0, 256, 4096, dtype=np.uint8).tobytes()
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + _chunk(b"IHDR", ihdr) + _chunk(b"IDAT", idat) + _chunk(b"IEND", b""))
    return path


def truncated_jpeg(path: Path, src: Path) -> Path:
    data = io.BytesIO()
    gray_of(src).save(data, "JPEG", quality=95)
    b = data.getvalue()
    path.write_bytes(b[: len(b) // 2])
    return path


# --- pictures that are not chest X-rays (the verdict must say `refer`, or the API a 4xx) ---------

def _photo() -> Image.Image:
    """A real photograph that ships inside scikit-learn (no download)."""
    from sklearn.datasets import load_sample_image

    return Image.fromarray(load_sample_image("china.jpg"))


def colour_photo(path: Path) -> Path:
    return _save(_photo(), path, "JPEG", quality=92)


def grey_photo(path: Path) -> Path:
    return _save(_photo().convert("L"), path, "PNG")


def blank_frame(path: Path, side: int = 512, level: int = 128) -> Path:
    return _save(Image.new("L", (side, side), level), path, "PNG")


def colour_gradient(path: Path, side: int = 256) -> Path:
    """A synthetic colour gradient, the kind of picture the old model called COVID at 0.96."""
    y, x = np.mgrid[0:side, 0:side].astype(np.float32) / (side - 1)
    rgb = np.stack([255 * x, 255 * y, 255 * (1 - x) * (1 - y)], -1).astype(np.uint8)
    return _save(Image.fromarray(rgb), path, "PNG")
