"""An uploaded file -> the checked film (data/checkfilm.py), or `ImageError` (a 4xx, guard.STATUS).

The upload size is checked from the file first; the rest is the project's one decode-and-check."""
from __future__ import annotations

from pathlib import Path

from covid_cxr.data.checkfilm import CheckedFilm, check_film
from covid_cxr.data.preprocess import ImageError
from covid_cxr.serve.settings import ServeSettings


def decode_upload(path: Path, settings: ServeSettings, min_side: int) -> CheckedFilm:
    """An uploaded file -> CheckedFilm (full-resolution 2-D uint8 grey), or ImageError; `min_side`
    is the model's (model.json input.min_side)."""
    size = path.stat().st_size
    if size > settings.max_upload_bytes:
        raise ImageError("upload_too_large", f"the file is {size / 1e6:.1f} MB, over the "
                         f"{settings.max_upload_bytes / 1024 / 1024:g} MB limit")
    return check_film(path.read_bytes(), min_side=min_side, max_pixels=settings.max_pixels)
