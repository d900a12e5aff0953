"""The novelty bank's bf16 features and the Grad-CAM probe's film sample."""
import numpy as np
import pytest
import torch

from covid_cxr.evaluation.probes import cam_sample
from covid_cxr.model.precision import cpu_has_bf16
from covid_cxr.model.nets import arch_norm, build
from covid_cxr.model.train import embeddings


def test_the_inference_body_folds_batchnorm_exactly():
    from covid_cxr.model.nets import InferenceBody

    torch.manual_seed(0)
    net = build("mobilenet_v2", pretrained=True).eval()
    imgs = np.random.default_rng(0).integers(0, 256, (6, 96, 96), dtype=np.uint8)
    norm = arch_norm("mobilenet_v2")
    f32, s32 = embeddings(net.embed, imgs, norm, bs=4)
    body = InferenceBody(net, None)
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in body.modules())   # folded away
    ff, sf = embeddings(body, imgs, norm, bs=4)
    assert torch.allclose(ff, f32, rtol=1e-4, atol=1e-4) and torch.allclose(sf, s32, rtol=1e-4, atol=1e-4)
    assert any(isinstance(m, torch.nn.BatchNorm2d) for m in net.modules())   # the trained net is untouched


@pytest.mark.skipif(not cpu_has_bf16(), reason="this CPU has no native bfloat16")
def test_bf16_from_a_module_keeps_the_taps_before_it_float32():
    from covid_cxr.model.nets import STYLE_TAPS, InferenceBody

    torch.manual_seed(0)
    net = build("mobilenet_v2", pretrained=True).eval()
    imgs = np.random.default_rng(0).integers(0, 256, (6, 96, 96), dtype=np.uint8)
    norm = arch_norm("mobilenet_v2")
    f32, s32 = embeddings(InferenceBody(net, None), imgs, norm, bs=4)
    f16, s16 = embeddings(InferenceBody(net, 2), imgs, norm, bs=4)
    assert f16.dtype == s16.dtype == torch.float32 and f16.shape == f32.shape and s16.shape == s32.shape
    assert not torch.equal(f16, f32)                       # the later modules really ran in bfloat16
    assert float(torch.nn.functional.cosine_similarity(f16, f32, dim=1).min()) > 0.99
    first = 2 * 16                                         # tap 1 (16 channels): mean and log-std, before module 2
    assert STYLE_TAPS["mobilenet_v2"][0] == 1
    assert torch.equal(s16[:, :first], s32[:, :first]) and not torch.equal(s16[:, first:], s32[:, first:])
    assert not torch.is_autocast_cpu_enabled()


def test_cam_sample_is_seeded_distinct_and_whole_when_small():
    a, b = cam_sample(900, 300), cam_sample(900, 300)
    assert np.array_equal(a, b) and len(np.unique(a)) == 300 and np.all(np.diff(a) > 0) and a.max() < 900
    assert not np.array_equal(a, np.arange(300))  # a sample across the split, not its first films
    assert np.array_equal(cam_sample(12, 300), np.arange(12))
