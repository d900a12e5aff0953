"""Image checks: the one implementation behind `covid-cxr data check` and the `prepare` stage.

Pixels are decoded only through `preprocess.open_image` / `to_gray`.

Per file we compute *stats* (`bytes`, `sha256`, `width`, `height`, `mode`, `dhash`, plus two
numbers for the "is this an X-ray at all" rule) and then *judge* them against the limits in
params.yaml. Every rejection has its own reason code (see `REASONS`).

The near-duplicate hash (`dhash`, a 64-bit int)
------------------------------------------------
The classic 9x8 dHash is useless on chest X-rays: every frontal film has the same layout, so
on this dataset it chains 3,627 of the 6,119 images into one near-duplicate cluster at <= 4 bits and
flags 233 of the 383 genuinely new batch-001 scans (9 of them at distance 0). So `dhash` here is a
64-bit *difference hash of the detail*: the greyscale image is shrunk to 40x40 (Lanczos), the
anatomy is removed by subtracting a Gaussian blur of itself (sigma 2.5 px: a band-pass that keeps
ribs, vessels, lines, text), and each bit is the sign of a fixed random projection of that
residual (SimHash: Hamming distance tracks the angle between two residuals). Measured on this
data: re-saving a scan at 224/299/512 px or as JPEG q70-85 moves it by <= 4 bits (p95 2-3); the
nearest batch-001 image to anything in data/ is 6 bits away; data/ itself holds 8 pairs within
4 bits, 7 of which are visibly the same film. A re-*cropped* copy (a few % of border) moves by
10+ bits and is not caught: the hash finds re-exports of one film, not every film of one patient.

The same-film signal (`thumb`, `film_pairs`)
---------------------------------------------
Re-crops are caught by a second signal. `thumb` is that same 40x40 thumbnail, stored (uint8,
base64) in the stats cache. Pairs are compared in two steps:
1. candidates (matrix products over all images): the 10x10 thumbnails correlate >= 0.97 (crops of
   a few %), or the low-frequency log spectra do >= 0.91 (larger crops: the spectrum's magnitude
   ignores where the content sits);
2. score: the crop is undone by aligning one thumbnail onto the other (scale and shift per axis:
   from the row/column profiles, then Gauss-Newton on the 40x40 image), and the score is the
   correlation of the band-passed detail (sigma 1.5 px) over the overlap. Measured on data/ and
   checked by eye: the same film under another crop or a re-export scores 0.95-1.0; another film of the same patient and view 0.85-0.93; look-alike films of different
   patients (the paediatric Viral Pneumonia ones above all) score under 0.85, with a grey zone of
   same-patient and look-alike pairs at 0.80-0.85. `prepare.near_dup_corr` (0.85) is the bar: it
   joins 76 pairs of data/ (none across classes; groups of at most 3). A plain thumbnail
   correlation cannot separate these: at the bar where it stops joining look-alikes (0.975 on
   32x32) it joins 22 pairs, 21 of them among the 76 (the other scores 0.81: two films of one patient).
Reach, measured with random re-crops of 300 data/ images (each side cut by 0-12 %): every copy
with all cuts <= 4 % is found, 59 % of those with a cut of 4-8 %, 9 % beyond (the candidate step is
the limit; given the pair, the score is >= 0.85 for 96 % and 86 % of them). Cost on the 6,119
images: ~0.5 s for the candidates and ~0.4 s for the ~3,000 scores (2 loaded cores).
`covid-cxr data check` does not reject a same-film match (the dhash rule above does that for
re-exports): it marks it (`same_film_as`), and prepare keeps the two in one split.
"""
from __future__ import annotations

import base64
import hashlib
import json
import multiprocessing
import os
import re
import threading
from collections import Counter
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path, PurePath
from typing import Any, Sequence

import numpy as np

from covid_cxr.config import CLASSES, KAGGLE_ROOT, load_params, project_root
from covid_cxr.data.preprocess import ImageError, open_image, to_gray
from covid_cxr.data.xrayrule import BLANK_STD_MIN, COLOUR_MAX, GREY_MODES, THUMB_GRID, colourfulness, thumbnail  # noqa: F401

# --------------------------------------------------------------------------- reasons

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


# Perceptual hash constants. The stats cache is keyed by a digest of this file, so edits here
# invalidate it; STATS_VERSION is only for changes made elsewhere.
HASH_SIGMA = 2.5
HASH_SEED = 20240611
STATS_VERSION = 2

# Same-film signal (see the module docstring).
FILM_CANDIDATE = 0.97  # Pearson r of the 10x10 (4x4-pooled) thumbnails that makes a pair worth aligning...
FILM_CANDIDATE_SPECTRUM = 0.91  # ...or of their low-frequency log spectra (`_spectrum`)
FILM_SIGMA = 1.5  # band-pass of the aligned score, in px of the 40x40 thumbnail
FILM_BORDER = 3  # px of the thumbnail's edge left out of the score (film edges, burnt-in labels)
FILM_PRUNE = 0.6  # pairs scoring under this after the profile alignment get no 2-D alignment


# The "plainly not a chest X-ray" rules (colour, blank) and the 40x40 thumbnail live in
# xrayrule.py: serving and batch scoring apply them too.
HASH_GRID = THUMB_GRID


# --------------------------------------------------------------------------- limits


@dataclass(frozen=True)
class Limits:
    min_side: int = 64
    max_side: int = 4096
    modes: tuple[str, ...] = ("L", "I;16", "I", "RGB")
    near_dup_bits: int = 4
    near_dup_corr: float = 0.85
    colour_max: float = COLOUR_MAX
    blank_std_min: float = BLANK_STD_MIN

    @property
    def max_pixels(self) -> int:
        """Decode guard handed to open_image: anything over max_side^2 is rejected before decoding."""
        return self.max_side * self.max_side

    @classmethod
    def from_params(cls, params: dict[str, Any] | None = None) -> "Limits":
        if params is None:
            p = project_root() / "params.yaml"
            params = load_params(p) if p.exists() else {}
        v = params.get("validate", {}) or {}
        pr = params.get("prepare", {}) or {}
        d = cls()
        return cls(
            min_side=int(v.get("min_side", d.min_side)),
            max_side=int(v.get("max_side", d.max_side)),
            modes=tuple(v.get("modes", d.modes)),
            near_dup_bits=int(pr.get("near_dup_bits", d.near_dup_bits)),
            near_dup_corr=float(pr.get("near_dup_corr", d.near_dup_corr)),
        )


# --------------------------------------------------------------------------- hashing


_PROJ: np.ndarray | None = None


def _projection() -> np.ndarray:
    global _PROJ
    if _PROJ is None:
        # Legacy RandomState: its stream is frozen by NumPy, so hashes are stable across versions.
        _PROJ = np.random.RandomState(HASH_SEED).standard_normal((64, HASH_GRID * HASH_GRID)).astype(np.float32)
    return _PROJ


_BLUR: np.ndarray | None = None


def _blur_matrix(n: int, sigma: float) -> np.ndarray:
    """(n, n) matrix M with M @ x = Gaussian blur of x (edge-replicated, truncated at 4 sigma)."""
    r = int(4.0 * sigma + 0.5)
    x = np.arange(-r, r + 1, dtype=np.float64)
    k = np.exp(-0.5 * (x / sigma) ** 2)
    k /= k.sum()
    m = np.zeros((n, n))
    for i in range(n):
        for j, w in zip(np.clip(i + np.arange(-r, r + 1), 0, n - 1), k):
            m[i, j] += w
    return m.astype(np.float32)


def _blur(a: np.ndarray) -> np.ndarray:
    global _BLUR
    if _BLUR is None:
        _BLUR = _blur_matrix(HASH_GRID, HASH_SIGMA)
    return _BLUR @ a @ _BLUR.T


def hash_thumbnail(thumb: np.ndarray) -> int:
    """64-bit band-pass SimHash of a `thumbnail` (see the module docstring)."""
    resid = thumb - _blur(thumb)
    bits = (_projection() @ resid.ravel()) > 0
    return int(np.packbits(bits).view(">u8")[0])


def encode_thumb(thumb: np.ndarray) -> str:
    """A `thumbnail` as the cache stores it: uint8 grey levels, base64 (2,136 characters)."""
    return base64.b64encode(np.clip(np.rint(thumb), 0, 255).astype(np.uint8).tobytes()).decode("ascii")


def decode_thumbs(encoded: Sequence[str | None]) -> tuple[np.ndarray, np.ndarray]:
    """(thumbnails (n, HASH_GRID, HASH_GRID) float32, has (n,) bool); rows without one are zero."""
    out = np.zeros((len(encoded), HASH_GRID, HASH_GRID), np.float32)
    has = np.zeros(len(encoded), bool)
    for i, e in enumerate(encoded):
        if e:
            out[i] = np.frombuffer(base64.b64decode(e), np.uint8).reshape(HASH_GRID, HASH_GRID)
            has[i] = True
    return out, has


def hamming(a: int | np.ndarray, b: int | np.ndarray) -> np.ndarray | int:
    x = np.bitwise_xor(np.asarray(a, dtype=np.uint64), np.asarray(b, dtype=np.uint64))
    out = np.bitwise_count(x)
    return int(out) if out.ndim == 0 else out


# --------------------------------------------------------------------------- same-film signal


def _pool2(t: np.ndarray) -> np.ndarray:
    """(n, g, g) -> (n, g/2, g/2) by 2x2 means."""
    return 0.25 * (t[:, 0::2, 0::2] + t[:, 1::2, 0::2] + t[:, 0::2, 1::2] + t[:, 1::2, 1::2])


def _unit_rows(x: np.ndarray) -> np.ndarray:
    """Each row zero-mean and unit-length: dot products are Pearson correlations."""
    x = x.reshape(len(x), -1).astype(np.float32)
    x = x - x.mean(1, keepdims=True)
    return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-6)


_HANN: np.ndarray | None = None


def _spectrum(t: np.ndarray, k: int = 8) -> np.ndarray:
    """Log-magnitude of the lowest 2-D Fourier frequencies of each (Hann-windowed) thumbnail.

    The magnitude ignores where the content sits, and a scale change of 10-15 % barely moves the
    lowest frequencies: the candidate signal for larger crops, where the thumbnails themselves no
    longer line up.
    """
    global _HANN
    if _HANN is None:
        h = np.hanning(HASH_GRID).astype(np.float32)
        _HANN = h[:, None] * h[None, :]
    f = np.abs(np.fft.rfft2((t - t.mean((1, 2), keepdims=True)) * _HANN))
    low = np.concatenate([f[:, :k, :k].reshape(len(f), -1), f[:, -k + 1 :, 1:k].reshape(len(f), -1)], 1)
    return np.log1p(low)


def _pairs_over(a: np.ndarray, b: np.ndarray | None, floor: float, block: int = 1024) -> np.ndarray:
    """Flat pair codes i * len(b) + j of the dot products >= floor (within a: i < j only)."""
    nb = len(a) if b is None else len(b)
    out = []
    for s in range(0, len(a), block):
        if b is None:  # the upper triangle only
            i, j = np.nonzero(a[s : s + block] @ a[s:].T >= floor)
            j = j + s
            keep = j > i + s
            i, j = i[keep], j[keep]
        else:
            i, j = np.nonzero(a[s : s + block] @ b.T >= floor)
        out.append((i + s).astype(np.int64) * nb + j)
    return np.concatenate(out) if out else np.zeros(0, np.int64)


def film_candidates(thumbs: np.ndarray, others: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Index pairs worth aligning: (i, j) with i < j within `thumbs`, or (i into thumbs, j into others).

    A pair is a candidate when its 10x10 thumbnails correlate >= FILM_CANDIDATE (small crops) or
    the low-frequency spectra do >= FILM_CANDIDATE_SPECTRUM (larger crops). Blocked matrix products.
    """
    nb = len(thumbs) if others is None else len(others)
    if not len(thumbs) or not nb:
        return np.zeros(0, np.int64), np.zeros(0, np.int64)
    codes = []
    for feat, floor in ((lambda t: _unit_rows(_pool2(_pool2(t))), FILM_CANDIDATE),
                        (lambda t: _unit_rows(_spectrum(t)), FILM_CANDIDATE_SPECTRUM)):
        codes.append(_pairs_over(feat(thumbs), None if others is None else feat(others), floor))
    code = np.unique(np.concatenate(codes))
    return code // nb, code % nb


def _resampler(scale: np.ndarray, shift: np.ndarray, m: int) -> tuple[np.ndarray, np.ndarray]:
    """Per pair, the (m, m) bilinear matrix whose row k samples the source at scale*u_k + shift.

    Coordinates are normalised (-1..1 across the thumbnail), so parameters carry over between
    sizes. Also returns which samples fall inside the source.
    """
    u = (np.arange(m, dtype=np.float32) + 0.5) * (2.0 / m) - 1.0
    pos = (scale[:, None] * u + shift[:, None] + 1.0) * (m / 2.0) - 0.5
    inside = (pos >= -0.5) & (pos <= m - 0.5)
    pos = np.clip(pos, 0, m - 1)
    i0 = np.minimum(pos.astype(np.int64), m - 2)
    w = (pos - i0).astype(np.float32)
    r = np.zeros((len(pos), m, m), np.float32)
    np.put_along_axis(r, i0[..., None], (1 - w)[..., None], axis=2)
    np.put_along_axis(r, i0[..., None] + 1, w[..., None], axis=2)
    return r, inside


def _warp(a: np.ndarray, p: np.ndarray, border: int) -> tuple[np.ndarray, np.ndarray]:
    """a resampled at (sx*u + tx, sy*v + ty); the weight mask of samples inside a and the border."""
    m = a.shape[-1]
    rx, vx = _resampler(p[:, 0], p[:, 2], m)
    ry, vy = _resampler(p[:, 1], p[:, 3], m)
    w = vy[:, :, None] & vx[:, None, :]
    if border:
        w[:, :border], w[:, m - border :], w[:, :, :border], w[:, :, m - border :] = False, False, False, False
    return ry @ a @ rx.transpose(0, 2, 1), w.astype(np.float32)


def _align(a: np.ndarray, b: np.ndarray, p: np.ndarray, iters: int) -> None:
    """Gauss-Newton fit of b(u, v) ~ g * a(sx*u + tx, sy*v + ty) + c; p (n, 4) = sx, sy, tx, ty, in place."""
    n, m, _ = a.shape
    gy, gx = np.gradient(a, axis=(1, 2))
    stacked = np.concatenate([a, gx, gy], axis=2)  # warp the image and its gradients together
    u = (np.arange(m, dtype=np.float32) + 0.5) * (2.0 / m) - 1.0
    half = m / 2.0
    for _ in range(iters):
        rx, vx = _resampler(p[:, 0], p[:, 2], m)
        ry, vy = _resampler(p[:, 1], p[:, 3], m)
        wz = (ry @ stacked).reshape(n, m, 3, m).transpose(0, 2, 1, 3).reshape(n, 3 * m, m) @ rx.transpose(0, 2, 1)
        aw, gxw, gyw = wz[:, :m], wz[:, m : 2 * m], wz[:, 2 * m :]
        w = (vy[:, :, None] & vx[:, None, :]).astype(np.float32)
        w[:, 0], w[:, -1], w[:, :, 0], w[:, :, -1] = 0, 0, 0, 0
        cnt = np.maximum(w.sum((1, 2), keepdims=True), 1)
        ac = aw - (aw * w).sum((1, 2), keepdims=True) / cnt
        bc = b - (b * w).sum((1, 2), keepdims=True) / cnt
        g = (ac * bc * w).sum((1, 2), keepdims=True) / np.maximum((ac * ac * w).sum((1, 2), keepdims=True), 1e-6)
        r = ((g * ac - bc) * w).reshape(n, -1, 1)
        gw = g * w * half  # d(sample position in px) / d(normalised parameter) = m / 2
        jac = np.stack([gxw * u[None, None, :] * gw, gyw * u[None, :, None] * gw, gxw * gw, gyw * gw], 1)
        jac = jac.reshape(n, 4, -1)
        h = jac @ jac.transpose(0, 2, 1) + 1e-3 * np.eye(4, dtype=np.float32)
        p += np.linalg.solve(h, -(jac @ r))[..., 0]
        np.clip(p[:, :2], 0.75, 1.33, out=p[:, :2])  # a crop of at most ~25 % per axis
        np.clip(p[:, 2:], -0.3, 0.3, out=p[:, 2:])


_BANDPASS: np.ndarray | None = None


def _detail_corr(a: np.ndarray, b: np.ndarray, p: np.ndarray) -> np.ndarray:
    """Correlation of the band-passed detail of b and of a aligned onto it, over their overlap.

    -1 when under half of b is covered (a runaway alignment is never a match).
    """
    global _BANDPASS
    if _BANDPASS is None:
        _BANDPASS = _blur_matrix(HASH_GRID, FILM_SIGMA)
    bl = _BANDPASS
    aw, w = _warp(a, p, FILM_BORDER)
    x = aw - bl @ aw @ bl.T
    y = b - bl @ b @ bl.T
    cnt = w.sum((1, 2))
    c1 = np.maximum(cnt, 1)[:, None, None]
    x = (x - (x * w).sum((1, 2), keepdims=True) / c1) * w
    y = (y - (y * w).sum((1, 2), keepdims=True) / c1) * w
    r = (x * y).sum((1, 2)) / np.sqrt(np.maximum((x * x).sum((1, 2)) * (y * y).sum((1, 2)), 1e-12))
    full = (HASH_GRID - 2 * FILM_BORDER) ** 2
    return np.where(cnt >= 0.5 * full, r, -1.0).astype(np.float32)


def _standardise(t: np.ndarray) -> np.ndarray:
    t = t.astype(np.float32)
    t = t - t.mean((1, 2), keepdims=True)
    return t / np.maximum(t.std((1, 2), keepdims=True), 1e-6)


def _profile_align(a: np.ndarray, b: np.ndarray, iters: int = 8) -> tuple[np.ndarray, np.ndarray]:
    """1-D version of `_align` on (n, m) profiles: (scale, shift) with b(u) ~ g * a(scale*u + shift) + c."""
    n, m = a.shape
    s = np.ones(n, np.float32)
    t = np.zeros(n, np.float32)
    u = (np.arange(m, dtype=np.float32) + 0.5) * (2.0 / m) - 1.0
    ga = np.gradient(a, axis=1)
    for _ in range(iters):
        pos = (s[:, None] * u + t[:, None] + 1.0) * (m / 2.0) - 0.5
        w = ((pos >= 0) & (pos <= m - 1)).astype(np.float32)
        pos = np.clip(pos, 0, m - 1)
        i0 = np.minimum(pos.astype(np.int64), m - 2)
        f = (pos - i0).astype(np.float32)
        aw = np.take_along_axis(a, i0, 1) * (1 - f) + np.take_along_axis(a, i0 + 1, 1) * f
        gw = np.take_along_axis(ga, i0, 1) * (1 - f) + np.take_along_axis(ga, i0 + 1, 1) * f
        cnt = np.maximum(w.sum(1, keepdims=True), 1)
        ac = aw - (aw * w).sum(1, keepdims=True) / cnt
        bc = b - (b * w).sum(1, keepdims=True) / cnt
        g = (ac * bc * w).sum(1, keepdims=True) / np.maximum((ac * ac * w).sum(1, keepdims=True), 1e-6)
        r = (g * ac - bc) * w
        j2 = g * gw * w * (m / 2.0)
        j1 = j2 * u
        h11, h12, h22 = (j1 * j1).sum(1) + 1e-3, (j1 * j2).sum(1), (j2 * j2).sum(1) + 1e-3
        b1, b2 = -(j1 * r).sum(1), -(j2 * r).sum(1)
        det = h11 * h22 - h12 * h12
        s += (h22 * b1 - h12 * b2) / det
        t += (h11 * b2 - h12 * b1) / det
        np.clip(s, 0.75, 1.33, out=s)
        np.clip(t, -0.3, 0.3, out=t)
    return s, t


def film_scores(a: np.ndarray, b: np.ndarray, chunk: int = 2048) -> np.ndarray:
    """Same-film score of each pair (a[k], b[k]) of 40x40 thumbnails (module docstring), -1..1.

    The crop is first estimated from the row and column profiles (cheap), the pair is scored, and
    only pairs that might match (>= FILM_PRUNE) get the full 2-D alignment and a second score.
    """
    out = np.full(len(a), -1.0, np.float32)
    for s in range(0, len(a), chunk):  # bounded memory
        aa, bb = _standardise(a[s : s + chunk]), _standardise(b[s : s + chunk])
        sx, tx = _profile_align(aa.mean(1), bb.mean(1))
        sy, ty = _profile_align(aa.mean(2), bb.mean(2))
        p = np.stack([sx, sy, tx, ty], 1)
        sc = _detail_corr(aa, bb, p)
        keep = np.nonzero(sc >= FILM_PRUNE)[0]
        if len(keep):
            q = p[keep]
            _align(aa[keep], bb[keep], q, 4)
            sc[keep] = np.maximum(sc[keep], _detail_corr(aa[keep], bb[keep], q))
        out[s : s + chunk] = sc
    return out


def film_pairs(
    thumbs: np.ndarray, corr: float, others: np.ndarray | None = None
) -> list[tuple[int, int, float]]:
    """(i, j, score) of every same-film pair scoring >= corr: within `thumbs` (i < j), or between
    thumbs[i] and others[j]. Within one set, the earlier image is the one aligned onto the later."""
    i, j = film_candidates(thumbs, others)
    if not len(i):
        return []
    sc = film_scores(thumbs[i], (thumbs if others is None else others)[j])
    keep = np.nonzero(sc >= corr)[0]
    return [(int(i[k]), int(j[k]), float(sc[k])) for k in keep]


# --------------------------------------------------------------------------- per-file stats

def sha256_file(path: Path | str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


STAT_KEYS = (
    "bytes", "sha256", "width", "height", "mode", "format", "dhash", "thumb", "colour", "std", "error", "error_message",
)


def file_stats(path: Path | str, max_pixels: int) -> dict[str, Any]:
    """Raw, parameter-free facts about one file (cacheable). Never raises for a bad image."""
    data = Path(path).read_bytes()
    st: dict[str, Any] = dict.fromkeys(STAT_KEYS)
    st["bytes"] = len(data)
    st["sha256"] = hashlib.sha256(data).hexdigest()
    try:
        im = open_image(data, max_pixels=max_pixels)
    except ImageError as e:
        st["error"], st["error_message"] = e.code, e.message
        return st
    st["width"], st["height"] = im.size
    st["mode"], st["format"] = im.mode, im.format
    try:
        st["colour"] = round(colourfulness(im), 3)
        thumb = thumbnail(im if im.mode == "L" else to_gray(im))  # one decode; L needs no conversion
    except Exception as e:  # an exotic mode Pillow decodes but cannot convert
        st["error"], st["error_message"] = "corrupt", f"decoded, but cannot be converted to greyscale: {e}"
        return st
    st["std"] = round(float(thumb.std()), 3)
    st["dhash"] = hash_thumbnail(thumb)
    st["thumb"] = encode_thumb(thumb)
    return st


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
    return {"path": str(path), **_public(st), "accepted": reason == "ok", "reason": reason, "message": message}


def _public(st: dict[str, Any]) -> dict[str, Any]:
    return {k: st.get(k) for k in ("width", "height", "mode", "bytes", "sha256", "dhash")}


# --------------------------------------------------------------------------- cache


def _code_digest() -> str:
    """Digest of the code that produces stats (this module, preprocess, dicom, xrayrule): edits invalidate the cache."""
    from covid_cxr.data import dicom, preprocess, xrayrule

    h = hashlib.sha256(f"{STATS_VERSION}".encode())
    for mod in (__file__, preprocess.__file__, dicom.__file__, xrayrule.__file__):
        h.update(Path(mod).read_bytes())
    return h.hexdigest()[:16]


class StatsCache:
    """JSON cache of `file_stats`, one file per (code digest, max_pixels).

    Entries are keyed by absolute path and reused only while (size, mtime_ns, inode) match.
    """

    def __init__(self, cache_dir: Path, max_pixels: int):
        self.max_pixels = max_pixels
        self.path = Path(cache_dir) / f"imagestats-{_code_digest()}-{max_pixels}.json"
        self.entries: dict[str, list] = {}
        self.dirty = False
        try:
            self.entries = json.loads(self.path.read_text())["entries"]
        except (OSError, ValueError, KeyError, TypeError):
            self.entries = {}

    @staticmethod
    def _key(path: Path) -> tuple[str, list[int]]:
        p = Path(path).resolve()
        s = p.stat()
        return str(p), [s.st_size, s.st_mtime_ns, s.st_ino]

    def get(self, path: Path) -> dict[str, Any] | None:
        k, sig = self._key(path)
        e = self.entries.get(k)
        return e[1] if e and e[0] == sig else None

    def put(self, path: Path, st: dict[str, Any]) -> None:
        k, sig = self._key(path)
        self.entries[k] = [sig, st]
        self.dirty = True

    def save(self) -> None:
        if not self.dirty:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_name(f"{self.path.name}.{os.getpid()}.tmp")
        tmp.write_text(json.dumps({"version": STATS_VERSION, "entries": self.entries}))
        os.replace(tmp, self.path)
        self.dirty = False
        for old in self.path.parent.glob(f"imagestats-*-{self.max_pixels}.json"):
            if old != self.path:  # written by an older version of the code: never read again
                old.unlink(missing_ok=True)


def default_workers() -> int:
    """$COVID_CXR_WORKERS, else one decode process per core (at most 8).

    Measured on the 2-core box: threads do not help (Pillow's PNG decoder hands the GIL back and
    forth: 2 threads 650 img/s vs 850 for 1); processes cost +13 % CPU per image (0.95 -> 1.08 ms:
    fork, pickling), so on idle cores 2 processes are ~1.8x faster, on a saturated box no faster.
    """
    env = os.environ.get("COVID_CXR_WORKERS")
    return max(1, int(env)) if env else max(1, min(8, os.cpu_count() or 1))


POOL_MIN_FILES = 200  # below this a process pool costs more than it saves


def compute_stats(
    paths: Sequence[Path],
    max_pixels: int,
    *,
    workers: int | None = None,
    cache: StatsCache | None = None,
    progress: bool = False,
    desc: str = "checking images",
) -> list[dict[str, Any]]:
    """`file_stats` for many files, in order, reusing `cache` hits; `workers` processes for big lists."""
    out: list[dict[str, Any] | None] = [cache.get(p) if cache else None for p in paths]
    todo = [i for i, st in enumerate(out) if st is None]
    workers = min(workers or default_workers(), max(1, len(todo)))
    # Fork only from a single-threaded process (the CLI / DVC stage): forking a threaded one (a
    # Prefect worker, a server) can deadlock on a lock held by another thread; there we decode serially.
    ctx = None
    if workers > 1 and len(todo) >= POOL_MIN_FILES and threading.active_count() == 1:
        try:
            ctx = multiprocessing.get_context("fork")
        except ValueError:  # no fork on this platform
            ctx = None
    pool = ProcessPoolExecutor(workers, mp_context=ctx) if ctx else None
    try:
        if pool:  # submit (and so fork) before tqdm starts its monitor thread
            results = pool.map(partial(file_stats, max_pixels=max_pixels), [paths[i] for i in todo], chunksize=64)
        else:
            results = (file_stats(paths[i], max_pixels) for i in todo)
        bar = None
        if progress and todo:
            from tqdm import tqdm

            bar = tqdm(total=len(todo), desc=desc, unit="img", dynamic_ncols=True)
        for i, st in zip(todo, results):
            out[i] = st
            if bar:
                bar.update()
        if bar:
            bar.close()
    finally:
        if pool:
            pool.shutdown()
    if cache:
        for i in todo:
            cache.put(paths[i], out[i])  # type: ignore[arg-type]
        cache.save()
    return out  # type: ignore[return-value]


# --------------------------------------------------------------------------- layouts

_CLASS_ALIASES = {
    "covid": "COVID",
    "covid19": "COVID",
    "covid 19": "COVID",
    "normal": "Normal",
    "viral pneumonia": "Viral Pneumonia",
}
_SKIP_CLASS = {"lung opacity"}


def _norm(name: str) -> str:
    return re.sub(r"[\s_\-]+", " ", name.strip().lower())


def canonical_class(folder: str | None) -> str | None:
    """'covid' / 'NORMAL' / 'Viral_Pneumonia' / 'viral-pneumonia' -> canonical class, else None."""
    if not folder:
        return None
    return _CLASS_ALIASES.get(_norm(folder))


@dataclass
class SourceFile:
    path: Path
    rel: str
    folder: str | None  # the class folder as spelled on disk (None: not inside one)
    label: str | None  # canonical class or None


@dataclass
class Scan:
    files: list[SourceFile] = field(default_factory=list)
    skipped: Counter = field(default_factory=Counter)

    def skipped_line(self) -> str:
        return skipped_line(self.skipped)


def skipped_line(skipped: dict[str, int]) -> str:
    """One line naming what a Kaggle archive carries that we leave out ('' when nothing)."""
    if not skipped:
        return ""
    parts = ", ".join(f"{k} ({v} file{'s' if v != 1 else ''})" for k, v in sorted(skipped.items()))
    return f"Skipped, not part of this dataset: {parts}."


def _is_hidden(part: str) -> bool:
    return part.startswith(".") or part == "__MACOSX"


def skip_kind(rel: PurePath) -> str | None:
    """Why a Kaggle-archive member is not ours (masks/, Lung_Opacity/, *.xlsx), else None."""
    dirs = rel.parts[:-1]
    if any(d.lower() == "masks" for d in dirs):
        return "masks/"
    if any(_norm(d) in _SKIP_CLASS for d in dirs):
        return "Lung_Opacity/"
    if rel.suffix.lower() == ".xlsx":
        return "*.xlsx"
    return None


def scan_source(src: Path) -> Scan:
    """Every candidate image file under `src` with its class folder, in sorted order.

    Accepts the Kaggle layout (`[COVID-19_Radiography_Dataset/]<Class>/images/<file>`) and the flat
    layout (`<Class>/<file>`). Skips (and counts) what a Kaggle archive carries that is not ours:
    `masks/` folders, the `Lung_Opacity` class, `*.xlsx` metadata and top-level README/licence files.
    """
    src = Path(src)
    scan = Scan()
    for p in sorted(src.rglob("*")):
        rel = p.relative_to(src)
        if any(_is_hidden(part) for part in rel.parts) or not p.is_file():
            continue
        kind = skip_kind(rel)
        if kind:
            scan.skipped[kind] += 1
            continue
        dirs = list(rel.parts[:-1])
        if dirs and dirs[-1].lower() == "images":
            dirs.pop()
        if dirs and dirs[0] == KAGGLE_ROOT:
            dirs.pop(0)
        folder = dirs[-1] if dirs else None
        if folder is None and re.match(r"(?i)(readme|licen[cs]e)", p.name):
            scan.skipped["README/licence"] += 1
            continue
        scan.files.append(SourceFile(p, rel.as_posix(), folder, canonical_class(folder)))
    return scan


def data_image_files(data_dir: Path) -> list[SourceFile]:
    """The images of the project's data/ folder (Kaggle layout)."""
    return scan_source(Path(data_dir)).files


# --------------------------------------------------------------------------- data index


class DataIndex:
    """sha256, dhash and thumbnail of everything already in data/, for duplicate checks."""

    def __init__(self, paths: list[Path], stats: list[dict[str, Any]]):
        self.by_sha: dict[str, Path] = {}
        hp, hv = [], []
        for p, st in zip(paths, stats):
            self.by_sha.setdefault(st["sha256"], p)
            if st.get("dhash") is not None:
                hp.append(p)
                hv.append(st["dhash"])
        self.hash_paths = hp
        self.hashes = np.array(hv, dtype=np.uint64)
        thumbs, has = decode_thumbs([st.get("thumb") for st in stats])
        self.thumb_paths = [p for p, h in zip(paths, has) if h]
        self.thumbs = thumbs[has]

    def same_films(self, encoded: Sequence[str | None], corr: float) -> dict[int, tuple[Path, float]]:
        """For each encoded thumbnail that matches a film in data/ (score >= corr): its best match."""
        thumbs, has = decode_thumbs(encoded)
        idx = np.nonzero(has)[0]
        best: dict[int, tuple[Path, float]] = {}
        if not len(idx) or not len(self.thumbs):
            return best
        for i, j, sc in film_pairs(self.thumbs, corr, others=thumbs[idx]):  # data film i ~ new file j
            k = int(idx[j])
            if k not in best or sc > best[k][1]:
                best[k] = (self.thumb_paths[i], sc)
        return best

    @classmethod
    def build(
        cls, data_dir: Path, limits: Limits, *, cache_dir: Path | None = None, workers: int | None = None,
        progress: bool = False,
    ) -> "DataIndex":
        files = [f.path for f in data_image_files(data_dir)]
        cache = StatsCache(cache_dir if cache_dir else default_cache_dir(data_dir), limits.max_pixels)
        stats = compute_stats(files, limits.max_pixels, workers=workers, cache=cache, progress=progress,
                              desc="indexing data/")
        return cls(files, stats)

    def nearest(self, h: int) -> tuple[Path | None, int]:
        if h is None or len(self.hashes) == 0:
            return None, 65
        d = hamming(self.hashes, h)
        i = int(np.argmin(d))
        return self.hash_paths[i], int(d[i])


def default_cache_dir(data_dir: Path) -> Path:
    """`.cache/covid_cxr/` beside the data folder (the project root for the real data)."""
    return Path(data_dir).resolve().parent / ".cache" / "covid_cxr"


# --------------------------------------------------------------------------- batch check


def check_source(
    batch_dir: Path,
    data_dir: Path | None = None,
    *,
    limits: Limits | None = None,
    workers: int | None = None,
    cache_dir: Path | None = None,
    progress: bool = False,
) -> tuple[list[dict[str, Any]], Scan]:
    """`check_batch` plus the scan (what was skipped)."""
    limits = limits or Limits.from_params()
    scan = scan_source(Path(batch_dir))
    index = (
        DataIndex.build(Path(data_dir), limits, cache_dir=cache_dir, workers=workers, progress=progress)
        if data_dir is not None and Path(data_dir).exists()
        else None
    )
    stats = compute_stats([f.path for f in scan.files], limits.max_pixels, workers=workers, progress=progress)
    films = index.same_films([st.get("thumb") for st in stats], limits.near_dup_corr) if index is not None else {}
    seen: dict[str, str] = {}
    results = []
    for k, (f, st) in enumerate(zip(scan.files, stats)):
        reason, message = judge(st, limits)
        extra: dict[str, Any] = {}
        if reason == "ok" and f.label is None:
            reason = "unknown_class"
            message = (
                f"folder {f.folder!r} is not a class ({', '.join(CLASSES)})" if f.folder
                else "file is not inside a class folder"
            )
        if reason == "ok" and index is not None and st["sha256"] in index.by_sha:
            reason, extra["duplicate_of"] = "duplicate", str(index.by_sha[st["sha256"]])
            message = f"identical to {extra['duplicate_of']}"
        if reason == "ok" and st["sha256"] in seen:
            reason, extra["duplicate_of"] = "duplicate_in_batch", seen[st["sha256"]]
            message = f"identical to {seen[st['sha256']]} in this batch (that copy is kept)"
        if reason == "ok" and index is not None:
            near, dist = index.nearest(st["dhash"])
            if near is not None and dist <= limits.near_dup_bits:
                reason, extra["duplicate_of"], extra["distance"] = "near_duplicate", str(near), dist
                message = f"near-duplicate of {near} (dhash distance {dist} <= {limits.near_dup_bits} bits)"
        if reason == "ok":
            seen[st["sha256"]] = str(f.path)
            if k in films:  # accepted all the same: prepare keeps it in that film's split
                extra["same_film_as"], extra["film_corr"] = str(films[k][0]), round(films[k][1], 3)
        results.append(
            {
                "path": str(f.path),
                "label": f.label,
                "folder": f.folder,
                **_public(st),
                "accepted": reason == "ok",
                "reason": reason,
                "message": message,
                **extra,
            }
        )
    return results, scan


def check_batch(batch_dir: Path, data_dir: Path | None = None, **kw) -> list[dict[str, Any]]:
    """Check every file of an incoming batch (Kaggle or flat layout) against the rules and data/.

    Each result has `path`, `label` (canonical class or None), `accepted`, `reason` ("ok" when
    accepted), `message`, the image stats and, for duplicates, `duplicate_of`.
    """
    return check_source(batch_dir, data_dir, **kw)[0]


def summarize(results: list[dict[str, Any]]) -> dict[str, Any]:
    reasons = Counter(r["reason"] for r in results)
    labels = Counter(r["label"] for r in results if r["accepted"])
    return {
        "files": len(results),
        "accepted": sum(r["accepted"] for r in results),
        "rejected": sum(not r["accepted"] for r in results),
        "by_reason": dict(sorted(reasons.items())),
        "accepted_by_class": {c: labels.get(c, 0) for c in CLASSES},
        "accepted_same_film": sum(1 for r in results if r["accepted"] and r.get("same_film_as")),
    }


def write_report(results: list[dict[str, Any]], path: Path | str, skipped: dict[str, int] | None = None) -> Path:
    """JSON report: summary counts and every file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    doc = {"summary": summarize(results), "skipped": dict(skipped or {}), "files": results}
    path.write_text(json.dumps(doc, indent=2, default=str))
    return path


def format_summary(results: list[dict[str, Any]]) -> str:
    s = summarize(results)
    lines = [f"{'reason':<20} {'files':>6}  meaning", f"{'-' * 20} {'-' * 6}  {'-' * 40}"]
    for reason, n in sorted(s["by_reason"].items(), key=lambda kv: (kv[0] != "ok", kv[0])):
        lines.append(f"{reason:<20} {n:>6}  {REASONS.get(reason, '')}")
    per_class = ", ".join(f"{c} {n}" for c, n in s["accepted_by_class"].items())
    lines.append(f"{s['accepted']} of {s['files']} files accepted ({per_class})")
    if s["accepted_same_film"]:
        lines.append(
            f"{s['accepted_same_film']} accepted file(s) look like a re-crop of a film already in data/ "
            "(same_film_as in the report); prepare keeps each in that film's split"
        )
    return "\n".join(lines)


# --------------------------------------------------------------------------- CLI


def register(app, data_app) -> None:
    import typer

    @data_app.command("check")
    def check_cmd(
        directory: Path = typer.Argument(..., exists=True, file_okay=False, help="Batch folder (Kaggle or flat layout)."),
        report: Path = typer.Option(None, "--report", help="Write the JSON report here [default: DIR-check.json in .cache]."),
        data_dir: Path = typer.Option(None, "--data", help="The project's data folder [default: <root>/data]."),
        show: int = typer.Option(10, help="List at most this many rejected files."),
    ) -> None:
        """Check a batch of images before import. Changes nothing but the report; exit 1 if any file is rejected."""
        from covid_cxr.config import Paths

        paths = Paths()
        data_dir = data_dir or paths.data
        results, scan = check_source(directory, data_dir, limits=Limits.from_params(), progress=True)
        if scan.skipped:
            typer.echo(scan.skipped_line())
        report = report or paths.cache / "reports" / f"{Path(directory).resolve().name}-check.json"
        write_report(results, report, scan.skipped)
        typer.echo(format_summary(results))
        bad = [r for r in results if not r["accepted"]]
        for r in bad[:show]:
            typer.echo(f"  REJECTED {r['path']}: {r['reason']}: {r['message']}")
        if len(bad) > show:
            typer.echo(f"  ... and {len(bad) - show} more (see the report)")
        typer.echo(f"Report: {report}")
        if not results:
            typer.echo("No image files found.")
            raise typer.Exit(1)
        raise typer.Exit(1 if bad else 0)
