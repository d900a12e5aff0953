"""An uploaded file -> `Upload`: the full-resolution grey pixels, the not-an-X-ray rule it fails
(or None) and what the prediction log may know of it, or `ImageError` (a 4xx, guard.STATUS)."""
from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from covid_cxr.data.preprocess import ImageError, open_image, to_gray
from covid_cxr.data.xrayrule import xray_rule
from covid_cxr.serve.settings import ServeSettings


@dataclass
class Upload:
    """One decoded upload: pixels, the not-an-X-ray rule it fails (or None), and what the
    prediction log may know of it (size, mode, format, sha256; never pixels or names)."""

    gray: np.ndarray
    rule: str | None
    info: dict[str, Any]


def decode_upload(path: Path, settings: ServeSettings) -> Upload:
    """An uploaded file -> Upload (full-resolution 2-D uint8 grey), or ImageError."""
    size = path.stat().st_size
    if size > settings.max_upload_bytes:
        raise ImageError("upload_too_large", f"the file is {size / 1e6:.1f} MB, over the "
                         f"{settings.max_upload_bytes / 1024 / 1024:g} MB limit")
    data = path.read_bytes()
    im = open_image(data, max_pixels=settings.max_pixels)
    if min(im.size) < settings.min_side:
        raise ImageError("too_small", f"the image is {im.size[0]}x{im.size[1]} px; "
                         f"both sides must be at least {settings.min_side} px")
    try:
        gray = to_gray(im)
    except Exception as e:  # an exotic mode Pillow cannot convert is still the input's fault
        raise ImageError("corrupt", f"cannot convert the {im.mode} image to greyscale: {e}") from None
    info = {"width": im.size[0], "height": im.size[1], "mode": im.mode, "format": im.format,
            "sha256": hashlib.sha256(data).hexdigest()}
    return Upload(gray, xray_rule(im, gray), info)
