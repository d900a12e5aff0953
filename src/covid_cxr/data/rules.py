"""Rejection rules: the reason codes (`REASONS`), the `Limits` from params.yaml and `judge`.

`judge` holds one file's stats (`filestats.file_stats`) against the limits; `check_file` does both
for one file. Class folders and duplicates are the batch check's (`imagecheck.check_source`).
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from covid_cxr.config import load_params, project_root
from covid_cxr.data.filestats import file_stats
from covid_cxr.data.xrayrule import BLANK_STD_MIN, COLOUR_MAX

REASONS: dict[str, str] = {
    "ok": "accepted",
    "empty": "0-byte file",
    "not_an_image": "not an image file",
    "corrupt": "undecodable or truncated image data",
    "unsupported_format": "image format not accepted",
    "animated": "animated image",
    "too_small": "under validate.min_side pixels on a side",
    "too_large": "over validate.max_side pixels on a side",
    "bad_mode": "pixel mode not in validate.modes",
    "not_xray_colour": "a colour picture, not a chest X-ray",
    "not_xray_blank": "a near-constant (blank) image, not a chest X-ray",
    "unknown_class": "not inside a COVID / Normal / Viral Pneumonia folder",
    "duplicate": "exact copy (sha256) of an image already in data/",
    "duplicate_in_batch": "exact copy (sha256) of an earlier file in this batch",
    "near_duplicate": "near-duplicate (dhash) of an image already in data/",
}
# Not a rejection: an accepted file that looks like a re-crop of a film already in data/ carries
# `same_film_as` / `film_corr`; `prepare` then keeps it in that film's split.


@dataclass(frozen=True)
class Limits:
    """The data rules' limits: params.yaml `validate` (sides, modes) and `prepare` (near-duplicates);
    the not-an-X-ray thresholds are xrayrule.py's, shared with serving."""

    min_side: int
    max_side: int
    modes: tuple[str, ...]
    near_dup_bits: int
    near_dup_corr: float
    colour_max: float = COLOUR_MAX
    blank_std_min: float = BLANK_STD_MIN

    @property
    def max_pixels(self) -> int:
        """Decode guard handed to open_image: anything over max_side^2 is rejected before decoding."""
        return self.max_side * self.max_side

    @classmethod
    def from_params(cls, params: dict[str, Any] | None = None) -> "Limits":
        """From params.yaml (the project's, when `params` is None)."""
        if params is None:
            params = load_params(project_root() / "params.yaml")
        v, pr = params["validate"], params["prepare"]
        return cls(min_side=int(v["min_side"]), max_side=int(v["max_side"]), modes=tuple(v["modes"]),
                   near_dup_bits=int(pr["near_dup_bits"]), near_dup_corr=float(pr["near_dup_corr"]))


def judge(st: dict[str, Any], limits: Limits) -> tuple[str, str]:
    """(reason, message) for one file's stats; reason 'ok' means accepted (class/duplicates aside)."""
    if st.get("error"):
        return st["error"], st.get("error_message") or REASONS.get(st["error"], st["error"])
    w, h = st["width"], st["height"]
    if min(w, h) < limits.min_side:
        return "too_small", f"image is {w}x{h}; each side must be at least {limits.min_side} px"
    if max(w, h) > limits.max_side:
        return "too_large", f"image is {w}x{h}; each side must be at most {limits.max_side} px"
    if st["mode"] not in limits.modes:
        return "bad_mode", f"pixel mode {st['mode']} is not one of {list(limits.modes)}; save it as greyscale"
    if st["colour"] is not None and st["colour"] > limits.colour_max:
        return "not_xray_colour", (
            f"colourful image (mean channel difference {st['colour']:.1f} > {limits.colour_max:g}): not a chest X-ray"
        )
    if st["std"] is not None and st["std"] < limits.blank_std_min:
        return "not_xray_blank", f"near-constant image (grey-level std {st['std']:.1f} < {limits.blank_std_min:g})"
    return "ok", "ok"


def check_file(path: Path | str, limits: Limits | None = None) -> dict[str, Any]:
    """Stats plus `accepted`/`reason`/`message` for one file (no class or duplicate checks)."""
    limits = limits or Limits.from_params()
    st = file_stats(path, limits.max_pixels)
    reason, message = judge(st, limits)
    return {"path": str(path), **public_stats(st), "accepted": reason == "ok", "reason": reason, "message": message}


def public_stats(st: dict[str, Any]) -> dict[str, Any]:
    """The stats a check result carries (the cache keeps more: thumbnail, colour, std)."""
    return {k: st.get(k) for k in ("width", "height", "mode", "bytes", "sha256", "dhash")}

