"""One film in: bytes -> the checked, full-resolution grey film, or ImageError (a clear reason).

The one decode-and-check path of an image to be scored: the service's uploads (serve/uploads.py),
`covid-cxr predict` and the `external` stage (evaluation/scoring.py) all call `check_film`:
    open_image (formats, DICOM, decompression-bomb guard) -> the minimum side -> to_gray
    -> the not-an-X-ray rules of `data check` (xrayrule.py)
What a log may know of the film (size, mode, format, sha256; never pixels or names) comes with it.
"""
from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Any

import numpy as np

from covid_cxr.data.preprocess import ImageError, open_image, to_gray
from covid_cxr.data.xrayrule import xray_rule


@dataclass(frozen=True)
class CheckedFilm:
    """A decoded film: 2-D uint8 grey pixels, the not-an-X-ray rule it fails (or None), and its
    width, height, mode, format (as opened) and sha256."""

    gray: np.ndarray
    rule: str | None
    width: int
    height: int
    mode: str
    format: str | None
    sha256: str

    @property
    def info(self) -> dict[str, Any]:
        """The fields a prediction log record takes from the film."""
        return {"width": self.width, "height": self.height, "mode": self.mode, "format": self.format,
                "sha256": self.sha256}


def check_film(data: bytes, *, min_side: int, max_pixels: int, sha256: str | None = None) -> CheckedFilm:
    """Decode and check one film's bytes (`sha256`: theirs, when the caller has it already)."""
    im = open_image(data, max_pixels=max_pixels)
    if min(im.size) < min_side:
        raise ImageError("too_small", f"the image is {im.size[0]}x{im.size[1]} px; "
                         f"both sides must be at least {min_side} px")
    try:
        gray = to_gray(im)
    except Exception as e:  # an exotic mode Pillow cannot convert is still the input's fault
        raise ImageError("corrupt", f"cannot convert the {im.mode} image to greyscale: {e}") from None
    return CheckedFilm(gray, xray_rule(im, gray), im.size[0], im.size[1], im.mode, im.format,
                       sha256 or hashlib.sha256(data).hexdigest())
