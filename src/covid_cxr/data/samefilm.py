"""The same-film score: is one thumbnail a re-crop (or re-export) of another film?

`film_candidates` picks the pairs worth aligning (matrix products over all images), `film_scores`
undoes the crop and scores the aligned band-passed detail, `film_pairs` does both. How it works,
where the 0.85 bar (`prepare.near_dup_corr`) comes from and what it reaches: docs/data-checks.md.
"""
from __future__ import annotations

import numpy as np

from covid_cxr.data.fingerprint import HASH_GRID, blur_matrix

# Same-film signal (see docs/data-checks.md).
FILM_CANDIDATE = 0.97  # Pearson r of the 10x10 (4x4-pooled) thumbnails that makes a pair worth aligning...
FILM_CANDIDATE_SPECTRUM = 0.91  # ...or of their low-frequency log spectra (`_spectrum`)
FILM_SIGMA = 1.5  # band-pass of the aligned score, in px of the 40x40 thumbnail
FILM_BORDER = 3  # px of the thumbnail's edge left out of the score (film edges, burnt-in labels)
FILM_PRUNE = 0.6  # pairs scoring under this after the profile alignment get no 2-D alignment


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
        _BANDPASS = blur_matrix(HASH_GRID, FILM_SIGMA)
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
    """Same-film score of each pair (a[k], b[k]) of 40x40 thumbnails (docs/data-checks.md), -1..1.

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

