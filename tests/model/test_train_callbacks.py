"""Training callbacks: bfloat16 autocast (forward in bf16; loss, gradients and weights in float32) and the weight EMA."""
import numpy as np
import torch

from covid_cxr.model.callbacks import bf16_autocast, weight_ema


def _learner(cbs):
    from fastai.data.core import DataLoaders
    from fastai.data.load import DataLoader
    from fastai.learner import Learner

    g = torch.Generator().manual_seed(0)
    x = torch.randn(64, 8, generator=g)
    y = (x[:, 0] > 0).long()
    dls = DataLoaders(DataLoader(list(zip(x, y)), bs=16, shuffle=True),
                      DataLoader(list(zip(x, y)), bs=32), device="cpu")
    net = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.BatchNorm1d(16), torch.nn.ReLU(), torch.nn.Linear(16, 2))
    learn = Learner(dls, net, loss_func=torch.nn.functional.cross_entropy, cbs=cbs)
    learn.recorder.train_metrics = False
    return learn, net


def test_forward_runs_in_bf16_and_the_rest_in_float32():
    from fastai.callback.core import Callback

    seen: dict[str, list] = {"hidden": [], "pred": [], "grad": []}

    class Spy(Callback):
        order = 20  # after BF16Autocast (10) has converted the prediction

        def after_pred(self):
            seen["pred"].append(self.pred.dtype)

        def after_backward(self):
            if self.training:
                seen["grad"].append(self.model[0].weight.grad.dtype)

    learn, net = _learner([bf16_autocast(), Spy()])
    net[0].register_forward_hook(lambda m, i, o: seen["hidden"].append(o.dtype))
    learn.fit(1, 1e-2)
    assert set(seen["hidden"]) == {torch.bfloat16}
    assert set(seen["pred"]) == {torch.float32}
    assert seen["grad"] and set(seen["grad"]) == {torch.float32}
    assert all(p.dtype == torch.float32 for p in net.parameters())
    assert not torch.is_autocast_enabled("cpu")  # left after every batch, validation included
    with torch.inference_mode():
        assert net(torch.randn(2, 8)).dtype == torch.float32


def test_bf16_training_learns_like_float32():
    torch.manual_seed(0)
    learn32, _ = _learner([])
    learn32.fit(3, 1e-2)
    torch.manual_seed(0)
    learn16, _ = _learner([bf16_autocast()])
    learn16.fit(3, 1e-2)
    v32, v16 = float(learn32.recorder.values[-1][0]), float(learn16.recorder.values[-1][0])
    assert np.isfinite(v16) and abs(v16 - v32) < 0.05


def test_weight_ema_is_the_warmed_up_average_of_the_weights_after_each_step():
    from fastai.callback.core import Callback

    steps: list[dict[str, torch.Tensor]] = []

    class Record(Callback):
        order = 95  # after WeightEMA (90)

        def after_step(self):
            steps.append({k: v.detach().clone() for k, v in self.model.state_dict().items()})

    torch.manual_seed(0)
    learn, net = _learner([])
    start = {k: v.detach().clone() for k, v in net.state_dict().items()}
    ema = weight_ema(net, 0.9)
    learn.add_cbs([ema, Record()])
    learn.fit(2, 1e-2)
    last = {k: v.clone() for k, v in net.state_dict().items()}
    ema.apply()
    expected = {k: v.clone() for k, v in start.items()}
    for n, w in enumerate(steps, start=1):
        d = min(0.9, (1 + n) / (10 + n))
        for k, v in w.items():
            expected[k] = expected[k] * d + v * (1 - d) if v.dtype.is_floating_point else v
    assert len(steps) == 8  # 64 films, batch 16, 2 epochs
    got = net.state_dict()
    for k in expected:
        assert torch.allclose(got[k].float(), expected[k].float(), atol=1e-6), k
    assert got["1.num_batches_tracked"] == last["1.num_batches_tracked"]  # counters are copied, not averaged
    assert not torch.allclose(got["0.weight"], last["0.weight"])  # the average is not the last weights
