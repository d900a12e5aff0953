"""The novelty bank's bf16 features and the Grad-CAM probe's film sample."""
import numpy as np
import pytest
import torch

from covid_cxr.evaluation.probes import cam_sample
from covid_cxr.model.precision import cpu_has_bf16
from covid_cxr.model.nets import arch_norm, build
from covid_cxr.model.train import embeddings


@pytest.mark.skipif(not cpu_has_bf16(), reason="this CPU has no native bfloat16")
def test_bank_features_under_bf16_are_float32_and_close_to_float32():
    torch.manual_seed(0)
    net = build("mobilenet_v2", pretrained=True).eval()
    rng = np.random.default_rng(0)
    imgs = rng.integers(0, 256, (6, 96, 96), dtype=np.uint8)
    norm = arch_norm("mobilenet_v2")
    f32, s32 = embeddings(net, imgs, norm, bs=4)
    f16, s16 = embeddings(net, imgs, norm, bs=4, bf16=True)
    assert f16.dtype == s16.dtype == torch.float32 and f16.shape == f32.shape and s16.shape == s32.shape
    assert not torch.equal(f16, f32)  # the bf16 path really ran in lower precision
    cos = torch.nn.functional.cosine_similarity(f16, f32, dim=1)
    assert float(cos.min()) > 0.99
    assert torch.allclose(s16, s32, rtol=0.05, atol=0.05)
    assert not torch.is_autocast_cpu_enabled()  # autocast ends with the call


def test_cam_sample_is_seeded_distinct_and_whole_when_small():
    a, b = cam_sample(900, 300), cam_sample(900, 300)
    assert np.array_equal(a, b) and len(np.unique(a)) == 300 and np.all(np.diff(a) > 0) and a.max() < 900
    assert not np.array_equal(a, np.arange(300))  # a sample across the split, not its first films
    assert np.array_equal(cam_sample(12, 300), np.arange(12))
