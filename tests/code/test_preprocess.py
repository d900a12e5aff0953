"""preprocess: the one decode/convert/normalise path used by training, evaluation and serving."""
from __future__ import annotations

import io
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import imgfactory as fx  # noqa: E402

from covid_cxr.data.preprocess import (  # noqa: E402
    ImageError,
    Norm,
    load_gray,
    normalize_batch,
    open_image,
    resize_gray,
    to_gray,
)


def encode(im: Image.Image, fmt: str = "PNG", **kw) -> bytes:
    b = io.BytesIO()
    im.save(b, fmt, **kw)
    return b.getvalue()


# --------------------------------------------------------------------------- open_image


@pytest.mark.parametrize(
    "make, code",
    [
        (fx.zero_bytes, "empty"),
        (fx.text_file, "not_an_image"),
        (fx.truncated, "corrupt"),
        (fx.huge_dims, "too_large"),
        (fx.animated_gif, "animated"),
        (fx.tga, "unsupported_format"),
    ],
)
def test_open_image_rejects_with_a_code(tmp_path, make, code):
    p = make(tmp_path / "x")
    with pytest.raises(ImageError) as e:
        open_image(p)
    assert e.value.code == code and e.value.message


def test_open_image_pixel_limit_is_checked_before_decoding(tmp_path):
    p = fx.png_gray(tmp_path / "a.png", size=(300, 200))
    assert open_image(p, max_pixels=60_000).size == (300, 200)
    with pytest.raises(ImageError) as e:
        open_image(p, max_pixels=59_999)
    assert e.value.code == "too_large" and "300x200" in e.value.message


def test_open_image_accepts_bytes_path_and_file_objects(tmp_path):
    p = fx.png_gray(tmp_path / "a.png", size=96, seed=3)
    data = p.read_bytes()
    want = np.asarray(Image.open(p))
    for src in (p, str(p), data, bytearray(data), io.BytesIO(data)):
        assert np.array_equal(np.asarray(open_image(src)), want)


def test_open_image_applies_exif_orientation():
    a = fx.gray_array((120, 80), seed=1)  # 80 rows x 120 columns
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 CW to display"
    im = open_image(encode(Image.fromarray(a), "JPEG", exif=exif, quality=95))
    assert im.size == (80, 120)


# --------------------------------------------------------------------------- to_gray


def test_to_gray_l_is_unchanged():
    a = fx.gray_array(64, seed=2)
    g = to_gray(Image.fromarray(a))
    assert g.dtype == np.uint8 and np.array_equal(g, a)


def test_to_gray_rgb_uses_luma():
    rgb = np.zeros((4, 4, 3), np.uint8)
    rgb[..., 0] = 255  # pure red -> ITU-R 601 luma 76
    g = to_gray(Image.fromarray(rgb, "RGB"))
    assert g.shape == (4, 4) and int(g[0, 0]) == 76


def test_to_gray_16bit_is_min_max_stretched(tmp_path):
    p = fx.png16(tmp_path / "a16.png", size=64)
    im = open_image(p)
    assert im.mode == "I;16"
    g = to_gray(im)
    assert g.dtype == np.uint8 and g.min() == 0 and g.max() == 255
    raw = np.asarray(im, dtype=np.float64)
    # monotone: brighter raw pixels never become darker
    order = np.argsort(raw.ravel(), kind="stable")
    assert np.all(np.diff(g.ravel()[order].astype(int)) >= 0)


def test_to_gray_constant_16bit_is_black():
    im = Image.fromarray(np.full((8, 8), 1234, np.uint16))
    assert not to_gray(im).any()


def test_to_gray_transparency_becomes_black_background():
    rgba = np.zeros((4, 4, 4), np.uint8)
    rgba[..., :3] = 255
    rgba[:2, :, 3] = 255  # top half opaque white, bottom half transparent white
    g = to_gray(Image.fromarray(rgba, "RGBA"))
    assert (g[:2] == 255).all() and (g[2:] == 0).all()


def test_to_gray_palette_and_cmyk():
    a = fx.gray_array(32, seed=4)
    p = Image.fromarray(a).convert("P")
    assert to_gray(p).shape == (32, 32)
    cmyk = Image.fromarray(a).convert("CMYK")
    assert to_gray(cmyk).dtype == np.uint8


# --------------------------------------------------------------------------- resize / load


def test_resize_gray_identity_and_shape():
    a = fx.gray_array(100, seed=5)
    assert resize_gray(a, 100) is a
    r = resize_gray(a, 40)
    assert r.shape == (40, 40) and r.dtype == np.uint8
    assert abs(float(r.mean()) - float(a.mean())) < 3


def test_load_gray_matches_the_step_by_step_path(tmp_path):
    p = fx.png16(tmp_path / "a.png", size=(90, 70), seed=6)
    want = resize_gray(to_gray(open_image(p)), 48)
    got = load_gray(p.read_bytes(), 48)
    assert got.shape == (48, 48) and np.array_equal(got, want)
    with pytest.raises(ImageError):
        load_gray(b"", 48)


# --------------------------------------------------------------------------- normalize


def test_normalize_batch_scales_then_normalises():
    torch = pytest.importorskip("torch")
    norm = Norm(mean=(0.5, 0.4, 0.3), std=(0.25, 0.2, 0.1))
    x = np.stack([fx.gray_array(16, seed=s) for s in range(3)])  # (B, H, W) uint8
    out = normalize_batch(x, norm, channels_last=False)
    assert out.shape == (3, 3, 16, 16) and out.dtype == torch.float32
    ref = (x[:, None].astype(np.float32) / 255.0 - np.array(norm.mean, np.float32)[None, :, None, None]) / np.array(
        norm.std, np.float32
    )[None, :, None, None]
    assert np.allclose(out.numpy(), ref, atol=1e-6)
    cl = normalize_batch(torch.as_tensor(x[:, None]), norm, channels_last=True)
    assert cl.is_contiguous(memory_format=torch.channels_last)
    assert torch.allclose(cl, out)


def test_a_read_only_batch_is_normalised_without_a_warning(tmp_path):
    """The decode cache is memory-mapped read-only: no torch UserWarning in `evaluate`'s output."""
    import warnings

    from covid_cxr.data.preprocess import Norm, normalize_batch

    rng = np.random.default_rng(0)
    np.save(tmp_path / "g.npy", (rng.random((3, 16, 16)) * 255).astype(np.uint8))
    ro = np.load(tmp_path / "g.npy", mmap_mode="r")
    assert not ro.flags.writeable
    norm = Norm(mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        got = normalize_batch(ro, norm)
    want = normalize_batch(np.array(ro), norm)
    assert got.shape == (3, 3, 16, 16) and bool((got == want).all())
