"""One normalisation path: the tensor training feeds the network is the tensor serving feeds it."""
from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("fastai")

from covid_cxr.config import load_params, project_root, train_config  # noqa: E402
from covid_cxr.data.preprocess import Norm, normalize_batch  # noqa: E402
from covid_cxr.model.nets import arch_norm  # noqa: E402
from covid_cxr.model.train import image_dls  # noqa: E402


@pytest.mark.parametrize("arch", ["mobilenet_v2", "efficientnet_lite0"])
def test_training_and_serving_tensors_of_one_film_are_equal(arch):
    cfg = train_config(load_params(project_root() / "params.yaml"))
    norm = arch_norm(arch)
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (12, 32, 32), dtype=np.uint8)
    labels = np.arange(12) % 3
    tr, va = np.arange(8), np.arange(8, 12)
    dls = image_dls(images, labels, tr, va, cfg, norm)
    x_serve = normalize_batch(images[va], norm, channels_last=bool(cfg["channels_last"]))

    # the training pipeline's own steps (all but fastai's random augmentation): exactly the serving tensor
    from fastai.vision.all import RandTransform, TensorImage

    steps = [t for t in dls.valid.after_batch.fs if not isinstance(t, RandTransform)]
    assert [type(t).__name__ for t in steps] == ["IntToFloatTensor", "SharedNormalize", "ChannelsLast"]
    x = TensorImage(torch.from_numpy(images[va])[:, None])
    for step in steps:
        x = step(x, split_idx=1)
    assert torch.equal(x.as_subclass(torch.Tensor), x_serve)
    assert x.is_contiguous(memory_format=torch.channels_last) == x_serve.is_contiguous(memory_format=torch.channels_last)

    # the whole valid batch: fastai also runs its affine step on valid, with the identity matrix;
    # its bilinear resample moves a pixel by < 1e-5 of the [0, 1] range, nothing more
    x_train, y = dls.valid.one_batch()
    assert x_train.shape == x_serve.shape == (4, 3, 32, 32)
    assert torch.allclose(x_train.as_subclass(torch.Tensor), x_serve, atol=1e-4, rtol=0)
    assert torch.equal(y.as_subclass(torch.Tensor), torch.as_tensor(labels[va]))  # labels pass through


def test_normalize_is_the_documented_affine_map():
    norm = Norm(mean=(0.5, 0.4, 0.3), std=(0.25, 0.2, 0.1))
    g = np.array([[[0, 255], [51, 102]]], np.uint8)
    out = normalize_batch(g, norm, channels_last=False).numpy()
    for c in range(3):
        assert np.allclose(out[0, c], (g[0] / 255.0 - norm.mean[c]) / norm.std[c], atol=1e-6)
    assert not np.allclose(out[0, 0], out[0, 2])  # per-channel statistics, not one shared pair


def test_the_training_precision_is_recorded_and_served_where_native(monkeypatch):
    import pytest

    from covid_cxr.model import precision

    params = load_params(project_root() / "params.yaml")
    setting = train_config(params)["inference"]
    monkeypatch.setattr(precision, "cpu_has_bf16", lambda: True)
    fitted = precision.fit_inference(setting)
    assert fitted == {"precision": "bfloat16", "bf16_from": int(setting["bf16_from"])}
    assert precision.serve_precision(fitted, "auto") == "bfloat16"
    assert precision.serve_precision(fitted, "float32") == "float32"
    monkeypatch.setattr(precision, "cpu_has_bf16", lambda: False)    # no native bf16: float32, both times
    assert precision.fit_inference(setting) == {"precision": "float32", "bf16_from": None}
    assert precision.serve_precision(fitted, "auto") == "float32"
    assert precision.fit_inference({"precision": "float32", "bf16_from": 2})["precision"] == "float32"
    with pytest.raises(ValueError, match="serve.precision"):
        precision.serve_precision(fitted, "bfloat16")
    with pytest.raises(ValueError, match="train.inference.precision"):
        precision.fit_inference({"precision": "fp16", "bf16_from": 2})


def test_the_torchvision_free_mobilenet_is_torchvisions():
    import torch
    from torchvision.models import mobilenet_v2

    from covid_cxr.model.nets import mobilenet_v2_features

    torch.manual_seed(0)
    tv = mobilenet_v2(weights=None).features.eval()
    for m in tv.modules():                                   # non-trivial BatchNorm statistics
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.uniform_(-0.1, 0.1)
            m.running_var.uniform_(0.5, 1.5)
    ours = mobilenet_v2_features().eval()
    theirs = {k: v.shape for k, v in tv.state_dict().items()}
    assert {k: v.shape for k, v in ours.state_dict().items()} == theirs
    ours.load_state_dict(tv.state_dict())
    x = torch.randn(2, 3, 96, 96)
    with torch.inference_mode():
        assert torch.equal(ours(x), tv(x))
