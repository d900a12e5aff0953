"""The error of `covid-cxr predict` (predict.py, predictinput.py, predictcsv.py)."""
from __future__ import annotations


class PredictError(RuntimeError):
    """A run that cannot start (no model, a bad zip, a CSV of another layout); the message says why."""
