"""Grad-CAM on a tiny hand-built network whose evidence location is known."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from covid_cxr.model.gradcam import colorize, gradcam, overlay, resize_cam, to_png
from covid_cxr.model.nets import ConcatPool


class Tiny(nn.Module):
    """body: one 4x4 stride-4 conv with two channels: brightness (ch 0) and darkness (ch 1).
    head: class 0 = "bright", class 1 = "dark" (linear on the pooled channel means only)."""

    def __init__(self):
        super().__init__()
        conv = nn.Conv2d(3, 2, 4, stride=4, bias=True)
        with torch.no_grad():
            conv.weight.zero_()
            conv.weight[0] = 1 / 48     # mean of the 3x4x4 patch
            conv.weight[1] = -1 / 48
            conv.bias[:] = torch.tensor([0.0, 1.0])
        self.body = nn.Sequential(conv, nn.ReLU())
        self.pool = ConcatPool()
        self.head = nn.Linear(4, 2, bias=False)
        with torch.no_grad():
            self.head.weight[:] = torch.tensor([[1.0, -1.0, 0.0, 0.0], [-1.0, 1.0, 0.0, 0.0]])

    def forward(self, x):
        return self.head(self.pool(self.body(x)))


def bright_square(n=1, size=32, at=(0, 0), side=8):
    x = torch.zeros(n, 3, size, size)
    y0, x0 = at
    x[:, :, y0:y0 + side, x0:x0 + side] = 1.0
    return x


def test_map_peaks_where_the_evidence_is():
    net = Tiny().eval()
    x = torch.cat([bright_square(at=(0, 0)), bright_square(at=(24, 24))])
    cams, logits, methods = gradcam(net, x, class_idx=0)
    assert cams.shape == (2, 32, 32) and cams.dtype == np.float32
    assert cams.min() >= 0 and cams.max() <= 1
    assert methods == ["grad-cam", "grad-cam"]
    assert cams[0, :8, :8].mean() > 0.5 > cams[0, 16:, 16:].mean()
    assert cams[1, 24:, 24:].mean() > 0.5 > cams[1, :16, :16].mean()
    np.testing.assert_allclose(logits.numpy(), net(x).detach().numpy(), atol=1e-6)


def test_default_class_is_the_top_class_and_explicit_class_changes_the_map():
    net = Tiny().eval()
    x = bright_square(at=(4, 4), side=24)  # 36 of the 64 cells bright: class 0 wins
    top, logits, _ = gradcam(net, x)
    assert int(logits.argmax()) == 0
    explicit, _, _ = gradcam(net, x, class_idx=0)
    np.testing.assert_allclose(top, explicit)
    dark, _, _ = gradcam(net, x, class_idx=1)
    # "dark" evidence lies outside the bright square
    assert dark[0, 8:24, 8:24].max() == 0 < dark[0, :3, :].mean()


def test_no_parameter_gradients_and_no_hooks_left():
    net = Tiny().eval()
    gradcam(net, bright_square(), class_idx=0)
    assert all(p.grad is None for p in net.parameters())
    assert not any(m._forward_hooks or m._backward_hooks for m in net.modules())


def test_positive_gradient_fallback_only_when_the_map_would_be_empty():
    net = Tiny().eval()
    with torch.no_grad():
        # class 0 = -mean(bright) - mean(dark) + 0.5 max(dark): every mean gradient is negative
        # (plain Grad-CAM is empty), yet the max branch gives one positive gradient on a dark cell.
        net.head.weight[:] = torch.tensor([[-1.0, -1.0, 0.0, 0.5], [1.0, 0.0, 0.0, 0.0]])
    x = bright_square(at=(0, 0), side=16)
    x[x == 0] = 0.2
    x[:, :, 28:, 28:] = 0.0  # one darkest cell: a unique max for the "dark" channel
    plain, _, m1 = gradcam(net, x, class_idx=0, positive_fallback=False)
    assert plain.max() == 0 and m1 == ["grad-cam"]
    cams, _, m2 = gradcam(net, x, class_idx=0)
    assert m2 == ["grad-cam (positive gradients)"]
    assert cams.max() == pytest.approx(1.0)
    assert cams[0, 16:, 16:].mean() > cams[0, :16, :16].mean()  # where it is dark


def test_colour_map_and_overlay():
    ramp = np.linspace(0, 1, 7, dtype=np.float32)[None]
    rgb = colorize(ramp)
    assert rgb.dtype == np.uint8 and rgb.shape == (1, 7, 3)
    assert tuple(rgb[0, 0]) == (0, 0, 128) and tuple(rgb[0, -1]) == (128, 0, 0)
    gray = np.full((40, 60), 100, np.uint8)
    cam = np.zeros((4, 4), np.float32)
    cam[:2, :2] = 1.0
    out = overlay(gray, cam)
    assert out.shape == (40, 60, 3)
    assert np.all(out[-5:, -5:] == 100), "cold regions keep the X-ray unchanged"
    assert out[:5, :5, 0].mean() > 110 or out[:5, :5, 2].mean() < 90
    assert resize_cam(cam, 60, 40).shape == (40, 60)
    png = to_png(out)
    assert png[:8] == b"\x89PNG\r\n\x1a\n"


def test_real_backbone_shapes():
    """The production architecture: 1280-channel last conv map, map at input size."""
    from covid_cxr.model.nets import build

    net = build("mobilenet_v2", pretrained=False).eval()
    x = torch.randn(2, 3, 64, 64)
    cams, logits, methods = gradcam(net, x)
    assert cams.shape == (2, 64, 64) and logits.shape == (2, 3) and len(methods) == 2
    assert np.isfinite(cams).all() and cams.max() <= 1
