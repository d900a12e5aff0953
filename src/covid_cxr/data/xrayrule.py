"""The "plainly not a chest X-ray" rules, shared by `data check` (rules.judge) and serving.

- colour: mean absolute difference between the R, G and B channels, in 0..255 grey levels.
  Greyscale X-rays (also when saved as RGB/JPEG) score ~0-2; photos and screenshots 20+.
- blank: standard deviation of the 40x40 greyscale thumbnail (the near-duplicate hash's).
  The 6,119 real images score >= 13.2 (median 58).

`xray_rule` applies both to one decoded upload, so a picture that `data check` would reject as
not an X-ray is never presented as a diagnosis (verdict `refer`, reason `not_an_xray`).
"""
from __future__ import annotations

import numpy as np

COLOUR_MAX = 12.0
BLANK_STD_MIN = 5.0
THUMB_GRID = 40
GREY_MODES = {"1", "L", "I", "I;16", "I;16B", "I;16L", "I;16N", "F"}


def thumbnail(gray) -> np.ndarray:
    """THUMB_GRID x THUMB_GRID float32 Lanczos thumbnail (box pre-reduction for speed).

    `gray`: a 2-D uint8 array, or a PIL image of mode L (the same pixels, without the copies).
    """
    from PIL import Image

    im = gray if isinstance(gray, Image.Image) else Image.fromarray(gray)
    im = im.resize((THUMB_GRID, THUMB_GRID), Image.Resampling.LANCZOS, reducing_gap=2.0)
    return np.asarray(im, dtype=np.float32)


def colourfulness(im) -> float:
    """Mean |R-G|, |G-B|, |R-B| over a <=128 px thumbnail, in grey levels (0 for grey modes)."""
    if im.mode in GREY_MODES or im.mode == "LA":
        return 0.0
    rgb = im.convert("RGB")
    f = max(1, min(rgb.size) // 128)
    if f > 1:
        rgb = rgb.reduce(f)
    a = np.asarray(rgb, dtype=np.int16)
    r, g, b = a[..., 0], a[..., 1], a[..., 2]
    return float((np.abs(r - g) + np.abs(g - b) + np.abs(r - b)).mean() / 3.0)


def xray_rule(im, gray: np.ndarray, colour_max: float = COLOUR_MAX, blank_std_min: float = BLANK_STD_MIN) -> str | None:
    """The rule one decoded image fails (`not_xray_colour`, `not_xray_blank`), or None."""
    if colourfulness(im) > colour_max:
        return "not_xray_colour"
    if float(thumbnail(gray).std()) < blank_std_min:
        return "not_xray_blank"
    return None
