"""fastai callbacks of the `train` stage: DVCLive curves, bfloat16 autocast and the weight EMA."""
from __future__ import annotations

from pathlib import Path



def live_curves(out_dir: Path):
    """A DVCLive logger for the per-epoch curves, and the fastai callback that feeds it."""
    from dvclive import Live
    from fastai.callback.core import Callback

    live = Live(dir=str(out_dir), save_dvc_exp=False, dvcyaml=None, report=None)

    class LiveCurves(Callback):
        order = 60  # after fastai's Recorder (50) holds the epoch's values

        def __init__(self, size: int):
            self.size = size

        def after_epoch(self):
            train_loss, valid_loss, acc = (float(v) for v in self.learn.recorder.values[-1][:3])
            live.log_metric("train/loss", train_loss)
            live.log_metric("valid/loss", valid_loss)
            live.log_metric("valid/accuracy", acc)
            live.log_metric("image_size", self.size, plot=False)
            live.next_step()

    return live, LiveCurves


def weight_ema(net, decay: float):
    """A fastai callback keeping an exponential moving average of `net`'s weights and buffers.

    Shared by every unfrozen stage (one average across the progressive resizing); `apply()` loads
    the average into `net` once training ends. Decay warms up as min(decay, (1 + n) / (10 + n)) so
    the first steps do not freeze the pretrained start into the average.
    """
    import torch
    from fastai.callback.core import Callback

    class WeightEMA(Callback):
        order = 90

        def __init__(self):
            self.shadow = {k: v.detach().clone() for k, v in net.state_dict().items()}
            self.n = 0

        @torch.no_grad()
        def after_step(self):
            self.n += 1
            d = min(decay, (1 + self.n) / (10 + self.n))
            for k, v in net.state_dict().items():
                if v.dtype.is_floating_point:
                    self.shadow[k].lerp_(v.detach(), 1 - d)
                else:
                    self.shadow[k].copy_(v)

        def apply(self):
            net.load_state_dict(self.shadow)

    return WeightEMA()


def bf16_autocast():
    """A fastai callback: forward and loss under CPU bfloat16 autocast, backward and weights in float32.

    Faster only where the CPU has native bf16 dot products and at larger images (experiments/bf16:
    x1.4 at 192 px, slower at 128 px). Inference (features, thresholds, evaluation, serving) stays float32.
    """
    import torch
    from fastai.callback.core import Callback

    class BF16Autocast(Callback):
        order = 10

        def before_batch(self):
            self.ctx = torch.autocast("cpu", dtype=torch.bfloat16)
            self.ctx.__enter__()

        def after_pred(self):
            self.learn.pred = self.pred.float()

        def _exit(self):
            if getattr(self, "ctx", None) is not None:
                self.ctx.__exit__(None, None, None)
                self.ctx = None

        def after_loss(self):
            self._exit()

        def after_batch(self):  # a cancelled batch skips after_loss
            self._exit()

    return BF16Autocast()
