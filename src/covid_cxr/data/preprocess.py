"""The one preprocessing path: bytes/file -> greyscale uint8 -> model tensor.

Training (via the decoded-image cache), evaluation and serving all call these
functions; there is no second copy of the transforms anywhere in the project.

`open_image` reads the Pillow formats in ALLOWED_FORMATS and DICOM (detected by content, see
`covid_cxr.data.dicom`): a DICOM comes back as an 8-bit `L` image with `format == "DICOM"` (modality
LUT, VOI LUT / window and MONOCHROME1 already applied), so every caller handles it unchanged.
"""
from __future__ import annotations

import io
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO, Union

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from covid_cxr.data.dicomsniff import is_dicom
from covid_cxr.data.errors import ImageError  # noqa: F401 - callers catch preprocess.ImageError

Source = Union[bytes, bytearray, str, Path, BinaryIO]

# Pillow warns about odd but readable files (bytes-transparency palettes, corrupt EXIF, malformed
# MPO): the checks here decide what an input is worth, and a warning in a user's output says nothing
# they can act on. Process-wide (thread-safe, unlike catch_warnings), and only for Pillow's modules.
warnings.filterwarnings("ignore", module=r"PIL\.")

# Default guards; serving makes them configurable (env vars, see service.py).
MAX_PIXELS = 100_000_000          # decompression-bomb guard (Pillow only warns below ~179 MP)
SHOWN_MAX = 512                   # the longest side of the film as /explain and the reports show it
ALLOWED_FORMATS = {"PNG", "JPEG", "MPO", "BMP", "TIFF", "GIF", "WEBP", "PPM"}


@dataclass(frozen=True)
class Norm:
    """Per-channel normalisation applied after scaling uint8 to [0, 1]."""

    mean: tuple[float, float, float]
    std: tuple[float, float, float]


def read_bytes(src: Source) -> bytes:
    if isinstance(src, (bytes, bytearray)):
        return bytes(src)
    if isinstance(src, (str, Path)):
        return Path(src).read_bytes()
    return src.read()


def open_image(src: Source, max_pixels: int = MAX_PIXELS) -> Image.Image:
    """Decode fully and safely, or raise ImageError with a clear reason.

    Checks size *before* decoding pixels, so a decompression bomb costs nothing.
    Applies the EXIF orientation so rotated phone/JPEG exports come out upright.
    DICOM (by content, not name) goes through `covid_cxr.data.dicom.open_dicom`.
    """
    data = read_bytes(src)
    if len(data) == 0:
        raise ImageError("empty", "the file is empty (0 bytes)")
    if is_dicom(data):
        from covid_cxr.data.dicom import open_dicom   # pydicom only for DICOM files (dicomsniff.py)

        return open_dicom(data, max_pixels)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            im = Image.open(io.BytesIO(data))
    except (UnidentifiedImageError, Image.DecompressionBombError) as e:
        if isinstance(e, Image.DecompressionBombError):
            raise ImageError("too_large", f"image is too large to decode safely: {e}") from None
        raise ImageError("not_an_image", "not a readable image (expected PNG, JPEG, BMP, TIFF, WebP or DICOM)") from None
    except Exception as e:  # pragma: no cover - Pillow raises odd things on garbage
        raise ImageError("not_an_image", f"not a readable image: {e}") from None
    if im.format not in ALLOWED_FORMATS:
        raise ImageError("unsupported_format", f"unsupported image format {im.format}")
    if getattr(im, "n_frames", 1) > 1 and im.format in {"GIF", "WEBP", "PNG"}:
        raise ImageError("animated", "animated images are not supported: upload a single frame")
    w, h = im.size
    if w * h > max_pixels:
        raise ImageError(
            "too_large", f"image is {w}x{h} = {w * h / 1e6:.1f} MP, over the {max_pixels / 1e6:.0f} MP limit"
        )
    try:
        im.load()
    except Exception as e:
        raise ImageError("corrupt", f"the image data is truncated or corrupt: {e}") from None
    fmt = im.format
    try:
        im = ImageOps.exif_transpose(im)
    except Exception:
        pass  # a broken EXIF block should not reject an otherwise fine image
    im.format = im.format or fmt  # a transposed copy forgets it; callers (logs, checks) read it
    return im


def to_gray(im: Image.Image) -> np.ndarray:
    """Any PIL mode -> 2-D uint8 greyscale. 16-bit/float data is min-max stretched."""
    mode = im.mode
    if mode in {"I;16", "I;16B", "I;16L", "I;16N", "I", "F"}:
        a = np.asarray(im, dtype=np.float32)
        if a.ndim == 3:
            a = a.mean(axis=2)
        lo, hi = float(a.min()), float(a.max())
        if hi <= lo:
            return np.zeros(a.shape, np.uint8)
        return np.clip((a - lo) * (255.0 / (hi - lo)) + 0.5, 0, 255).astype(np.uint8)
    if mode in {"RGBA", "LA", "PA"} or (mode == "P" and "transparency" in im.info):
        im = im.convert("RGBA")
        bg = Image.new("RGBA", im.size, (0, 0, 0, 255))  # X-rays: transparent = background = black
        im = Image.alpha_composite(bg, im)
    if mode == "CMYK" or im.mode not in {"L", "RGB"}:
        im = im.convert("RGB")
    if im.mode != "L":
        im = im.convert("L")
    return np.asarray(im, dtype=np.uint8)


def resize_gray(gray: np.ndarray, size: int) -> np.ndarray:
    """Square resize (X-rays here are square already), antialiased."""
    if gray.shape == (size, size):
        return gray
    return np.array(Image.fromarray(gray).resize((size, size), Image.Resampling.BILINEAR, reducing_gap=None))


def load_gray(src: Source, size: int, max_pixels: int = MAX_PIXELS) -> np.ndarray:
    """Bytes or path -> (size, size) uint8. The single entry point for pixels."""
    return resize_gray(to_gray(open_image(src, max_pixels=max_pixels)), size)


def normalize(x, norm: Norm):
    """Float (B,1|3,H,W) in [0, 1] -> (B,3,H,W): grey to three channels, minus mean, over std.

    The one normalisation: serving and evaluation reach it through `normalize_batch`, training
    through `fastai_normalize` (after its augmentation, which works on [0, 1] floats)."""
    import torch

    mean = torch.tensor(norm.mean, dtype=torch.float32).view(1, 3, 1, 1)
    std = torch.tensor(norm.std, dtype=torch.float32).view(1, 3, 1, 1)
    return (x.expand(-1, 3, -1, -1) - mean) / std


def normalize_batch(x, norm: Norm, channels_last: bool = True):
    """uint8 (B,H,W) / (B,1,H,W) -> float (B,3,H,W): scaled to [0, 1], then `normalize`."""
    import torch

    if not isinstance(x, torch.Tensor):
        a = np.asarray(x)   # a memory-mapped decode cache is read-only: copy it rather than warn
        x = torch.from_numpy(a if a.flags.writeable else a.copy())
    if x.ndim == 3:
        x = x[:, None]
    x = normalize(x.float().div_(255.0), norm)
    return x.contiguous(memory_format=torch.channels_last) if channels_last else x.contiguous()


def fastai_normalize(norm: Norm):
    """`normalize` as a fastai batch transform, at the place of fastai's own Normalize (order 99:
    after IntToFloatTensor and the augmentation). Images only; labels pass through."""
    from fastai.vision.all import TensorImage, Transform

    class SharedNormalize(Transform):
        order = 99

        def encodes(self, x):  # type: ignore[override]
            return normalize(x, norm) if isinstance(x, TensorImage) else x

    return SharedNormalize()
