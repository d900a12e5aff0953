"""Grad-CAM (Selvaraju et al., 2017) on the last conv feature map of `net.body`.

Pure torch + numpy. No hooks and no parameter gradients: the body runs under
`no_grad`, its output A is detached and made a leaf, and only pool+head run
with autograd, so `d score / d A` is the only gradient computed. That keeps it
cheap and safe to call from several threads on a shared, eval-mode network.
"""
from __future__ import annotations

import io

import numpy as np
import torch
import torch.nn.functional as F

# Anchor colours of a "jet"-like map: blue -> cyan -> green -> yellow -> red.
_ANCHORS = np.array(
    [[0, 0, 128], [0, 0, 255], [0, 255, 255], [0, 255, 0], [255, 255, 0], [255, 0, 0], [128, 0, 0]],
    dtype=np.float32,
)


def gradcam(net: torch.nn.Module, x: torch.Tensor, class_idx: int | list[int] | None = None,
            positive_fallback: bool = True, head=None) -> tuple[np.ndarray, torch.Tensor, list[str]]:
    """Class activation maps for a batch.

    `net` has `.body` (conv feature maps), `.pool` (B,C,h,w -> B,F) and `.head` (-> logits).
    `x` is the normalised model input (B,3,H,W). `class_idx`: the class to explain,
    per image or for all; None explains each image's top class. `head` (pooled features ->
    class scores) replaces `net.head`: `LoadedModel.cam_head()`, which explains a two-head
    model's mean answer.

    Grad-CAM weights each channel by its mean gradient. On small feature maps (3x3 to
    5x5 here) those weights can cancel out to an all-negative map, which ReLU turns into
    nothing. With `positive_fallback`, such a map is recomputed from the positive part of
    the gradients only (the idea behind Grad-CAM++): still "where did the evidence for this
    class come from", never an empty picture while some location raises the score.

    Returns (cams float32 (B,H,W) in [0,1] at input resolution, logits (B,n_classes),
    method per image: "grad-cam" or "grad-cam (positive gradients)"; a map is all zeros
    only when no location raises the class score at all).
    """
    with torch.no_grad():
        feats = net.body(x)
    a = feats.detach().float().requires_grad_(True)
    with torch.enable_grad():
        logits = (head if head is not None else net.head)(net.pool(a))
        if class_idx is None:
            idx = logits.argmax(dim=1)
        elif isinstance(class_idx, int):
            idx = torch.full((logits.shape[0],), class_idx, dtype=torch.long)
        else:
            idx = torch.as_tensor(class_idx, dtype=torch.long)
        score = logits.gather(1, idx.view(-1, 1)).sum()
        (grad,) = torch.autograd.grad(score, a)
    with torch.no_grad():
        weights = grad.mean(dim=(2, 3), keepdim=True)           # (B,C,1,1): channel importance
        cam = F.relu((weights * a).sum(dim=1, keepdim=True))    # (B,1,h,w)
        methods = ["grad-cam"] * cam.shape[0]
        if positive_fallback:
            empty = cam.flatten(1).amax(dim=1) <= 0
            if bool(empty.any()):
                pos = F.relu(grad).mean(dim=(2, 3), keepdim=True)
                alt = F.relu((pos * a).sum(dim=1, keepdim=True))
                cam = torch.where(empty.view(-1, 1, 1, 1), alt, cam)
                methods = ["grad-cam (positive gradients)" if e else m for e, m in zip(empty.tolist(), methods)]
        cam = F.interpolate(cam, size=x.shape[-2:], mode="bilinear", align_corners=False)[:, 0]
        peak = cam.flatten(1).amax(dim=1).view(-1, 1, 1)
        cam = torch.where(peak > 0, cam / peak.clamp_min(1e-12), torch.zeros_like(cam))
    return cam.clamp(0, 1).numpy().astype(np.float32), logits.detach(), methods


def colorize(cam: np.ndarray) -> np.ndarray:
    """(H,W) values in [0,1] -> (H,W,3) uint8 RGB with a jet-like colour map."""
    c = np.clip(np.nan_to_num(cam.astype(np.float32)), 0, 1) * (len(_ANCHORS) - 1)
    lo = np.floor(c).astype(np.int64)
    hi = np.minimum(lo + 1, len(_ANCHORS) - 1)
    f = (c - lo)[..., None]
    return (_ANCHORS[lo] * (1 - f) + _ANCHORS[hi] * f + 0.5).astype(np.uint8)


def resize_cam(cam: np.ndarray, width: int, height: int) -> np.ndarray:
    """Bilinear resize of a [0,1] map to (height, width)."""
    if cam.shape == (height, width):
        return cam
    t = torch.from_numpy(np.ascontiguousarray(cam, dtype=np.float32))[None, None]
    return F.interpolate(t, size=(height, width), mode="bilinear", align_corners=False)[0, 0].numpy()


def overlay(gray: np.ndarray, cam: np.ndarray, alpha: float = 0.45) -> np.ndarray:
    """Blend the colour map over a (H,W) uint8 greyscale image; the map is resized to fit.

    The colour is weighted by the map itself, so cold regions keep the X-ray visible.
    """
    h, w = gray.shape
    cam = resize_cam(cam, w, h)
    base = np.repeat(gray[..., None].astype(np.float32), 3, axis=2)
    heat = colorize(cam).astype(np.float32)
    wgt = (alpha * np.clip(cam, 0, 1) ** 0.5)[..., None]
    return np.clip(base * (1 - wgt) + heat * wgt + 0.5, 0, 255).astype(np.uint8)


def to_png(arr: np.ndarray) -> bytes:
    """uint8 (H,W) or (H,W,3) -> PNG bytes."""
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(np.ascontiguousarray(arr)).save(buf, format="PNG", optimize=False, compress_level=3)
    return buf.getvalue()
