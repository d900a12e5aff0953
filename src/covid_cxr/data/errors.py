"""The one error for an input that cannot become a model input (decoding, DICOM, limits)."""
from __future__ import annotations


class ImageError(ValueError):
    """An input that cannot become a model input. `code` is machine-readable."""

    def __init__(self, code: str, message: str):
        super().__init__(message)
        self.code = code
        self.message = message
