"""Stage `train`: fastai transfer learning, built to be fast on a 2-core CPU.

Recipe (params.yaml `train`; speed choices measured in bench/bench_train.py):
1. decoded-image cache: films are decoded once per size (data/cache.py);
2. frozen phase on cached body features: the head trains on pooled features computed once,
   instead of re-running the frozen backbone every epoch;
3. unfrozen phase: the top `unfreeze_groups` backbone groups train (the cpu profile unfreezes
   all four), groups left frozen stay in eval mode; discriminative learning rates, one-cycle
   schedules, label smoothing, radiograph-safe augmentation plus another site's processing
   (model/augment.py); progressive resizing when the profile names a `final_size`;
4. channels_last tensors (+~25% img/s on CPU); torch.compile is a param (off: no gain here); the
   final-size epochs may run under bfloat16 autocast, and a weight EMA may replace the last weights
   (model/callbacks.py).
Then, on train and valid only: calibration (model/calibration.py), the novelty model, the clean
second head on the same features (model/cleanhead.py, when `train.clean_head` is set) and the
refer thresholds.
Per-epoch loss and accuracy go to DVCLive (artifacts/train/: `dvc plots show`, `dvc exp show`).
"""
from __future__ import annotations

import os
import random
import time
from dataclasses import dataclass
from typing import Any

import numpy as np
import typer

from covid_cxr.config import CLASSES, Paths, load_params, train_config
from covid_cxr.provenance import data_md5, params_hash, record_run


def seed_everything(seed: int) -> None:
    import torch

    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


class _CacheDS:
    """fastai-compatible dataset over the uint8 cache: (TensorImage 1xHxW, TensorCategory).

    `acquisition` (training only) re-processes each film as another site might have
    (augment.Acquisition), on the uint8 pixels, before the shared normalisation.
    """

    def __init__(self, images: np.ndarray, labels: np.ndarray, acquisition=None, seed: int = 0):
        self.images, self.labels = images, labels
        self.acquisition = acquisition
        self.rng = np.random.default_rng(seed)

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int):
        from fastai.vision.all import TensorCategory, TensorImage
        import torch

        g = np.array(self.images[i])
        if self.acquisition:
            g = self.acquisition(g, self.rng)
        return TensorImage(torch.from_numpy(g)[None]), TensorCategory(int(self.labels[i]))


def batch_tfms(cfg: dict[str, Any], norm, split_idx: int):
    """IntToFloat -> radiograph-safe augmentation (train only) -> the shared Normalize."""
    from fastai.vision.all import IntToFloatTensor, Pipeline, Transform, aug_transforms
    import torch

    from covid_cxr.data.preprocess import fastai_normalize

    aug = cfg["augment"]
    tfms = [IntToFloatTensor()]
    tfms += aug_transforms(
        do_flip=bool(aug["flip_horizontal"]), flip_vert=False,
        max_rotate=float(aug["max_rotate"]), max_zoom=float(aug["max_zoom"]),
        max_lighting=float(aug["max_lighting"]), max_warp=0.0, p_affine=0.75, p_lighting=0.75,
    )
    tfms.append(fastai_normalize(norm))
    if cfg["channels_last"]:
        class ChannelsLast(Transform):
            order = 100

            def encodes(self, x: torch.Tensor):  # type: ignore[override]
                return x.contiguous(memory_format=torch.channels_last) if x.ndim == 4 else x
        tfms.append(ChannelsLast())
    return Pipeline(tfms, split_idx=split_idx)


def image_dls(cache: np.ndarray, labels: np.ndarray, tr: np.ndarray, va: np.ndarray, cfg, norm, seed: int = 0):
    from fastai.data.core import DataLoaders
    from fastai.data.load import DataLoader

    from covid_cxr.model.augment import Acquisition

    bs = int(cfg["batch_size"])
    workers = int(cfg["workers"])
    acq = Acquisition(cfg["augment"].get("acquisition"))
    tdl = DataLoader(_CacheDS(cache[tr], labels[tr], acq, seed), bs=bs, shuffle=True, drop_last=True,
                     num_workers=workers, after_batch=batch_tfms(cfg, norm, 0))
    vdl = DataLoader(_CacheDS(cache[va], labels[va]), bs=bs * 2, shuffle=False,
                     num_workers=workers, after_batch=batch_tfms(cfg, norm, 1))
    return DataLoaders(tdl, vdl, device="cpu")


def embeddings(body, images: np.ndarray, norm, bs: int = 64, desc: str = "features", channels_last=True):
    """`body` (nets.InferenceBody, or a net's `embed`) over images -> ((N, 2*nf) pooled features,
    (N, S) style vectors), float32."""
    import torch

    from covid_cxr.data.preprocess import normalize_batch
    from covid_cxr.progress import tqdm

    feats, style = [], []
    with torch.inference_mode():
        for i in tqdm(range(0, len(images), bs), desc=desc, unit="batch"):
            x = normalize_batch(np.asarray(images[i:i + bs]), norm, channels_last)
            f, s = body(x)
            feats.append(f.float())
            style.append(s.float())
    return torch.cat(feats), torch.cat(style)


def _timed(name: str, timings: dict[str, float]):
    class _T:
        def __enter__(self):
            self.t = time.perf_counter()
            typer.secho(f"▶ {name}", fg=typer.colors.CYAN)

        def __exit__(self, *exc):
            timings[name] = round(time.perf_counter() - self.t, 1)
            typer.echo(f"  {name}: {timings[name]:.1f} s")
    return _T()


@dataclass
class Run:
    """What the steps of one training run share."""

    paths: Paths
    cfg: dict[str, Any]          # the active profile with the shared train keys (config.train_config)
    df: Any                      # the manifest
    labels: np.ndarray           # class index per manifest row
    tr: np.ndarray               # train rows
    va: np.ndarray               # valid rows
    norm: Any
    timings: dict[str, float]
    inference: dict[str, Any]    # model.json `inference`: the precision answers are fitted in (model/precision.py)

    @property
    def channels_last(self) -> bool:
        return bool(self.cfg["channels_last"])

    @staticmethod
    def images(cache: np.ndarray, rows: np.ndarray) -> np.ndarray:
        return np.asarray(cache[rows])

    def decoded(self, size: int) -> np.ndarray:
        from covid_cxr.data.cache import decoded

        return decoded(self.df, size, self.paths.root, self.paths.cache, workers=os.cpu_count() or 1)


def start_run(paths: Paths, params: dict[str, Any]) -> Run:
    """Threads, seeds and the split: the manifest's train and valid rows."""
    import pandas as pd
    import torch

    from covid_cxr.model.nets import arch_norm
    from covid_cxr.model.precision import fit_inference

    cfg = train_config(params)
    torch.set_num_threads(max(1, os.cpu_count() or 1))
    seed_everything(int(cfg["seed"]))
    typer.echo(f"train: profile={cfg['profile']} arch={cfg['arch']} size={cfg['size']} "
               f"head_epochs={cfg['head_epochs']} unfrozen_epochs={cfg['unfrozen_epochs']} "
               f"unfreeze_groups={cfg['unfreeze_groups']} threads={torch.get_num_threads()}")
    df = pd.read_csv(paths.manifest)
    labels = df["label"].map({c: i for i, c in enumerate(CLASSES)}).to_numpy()
    if np.isnan(labels.astype(float)).any():
        raise typer.BadParameter(f"manifest has labels outside {CLASSES}")
    tr = np.flatnonzero(df["split"].to_numpy() == "train")
    va = np.flatnonzero(df["split"].to_numpy() == "valid")
    if len(tr) == 0 or len(va) == 0:
        raise RuntimeError("the manifest has no train or no valid rows: run `covid-cxr prepare`")
    return Run(paths, cfg, df, labels, tr, va, arch_norm(cfg["arch"]), {}, fit_inference(cfg["inference"]))


def build_net(run: Run):
    """The ImageNet-pretrained body with a fresh head (nets.py)."""
    import torch

    from covid_cxr.model.nets import build

    net = build(run.cfg["arch"], n_classes=len(CLASSES), pretrained=True)
    return net.to(memory_format=torch.channels_last) if run.channels_last else net


def fit_frozen_head(run: Run, net, cache: np.ndarray) -> None:
    """Phase 1: the body frozen, the head trained on its pooled features computed once."""
    import fastai.callback.progress  # noqa: F401  (progress bars)
    import fastai.callback.schedule  # noqa: F401  (fit_one_cycle)
    import torch
    from fastai.data.core import DataLoaders
    from fastai.data.load import DataLoader
    from fastai.learner import Learner
    from fastai.losses import CrossEntropyLossFlat
    from fastai.metrics import accuracy

    from covid_cxr.progress import quiet_fastai_if_not_tty

    cl = run.channels_last
    net.eval()
    f_tr, _ = embeddings(net.embed, cache[run.tr], run.norm, desc="body features (train)", channels_last=cl)
    f_va, _ = embeddings(net.embed, cache[run.va], run.norm, desc="body features (valid)", channels_last=cl)
    y_tr, y_va = torch.as_tensor(run.labels[run.tr]), torch.as_tensor(run.labels[run.va])
    fdls = DataLoaders(
        DataLoader(list(zip(f_tr, y_tr)), bs=64, shuffle=True, drop_last=len(f_tr) > 64),
        DataLoader(list(zip(f_va, y_va)), bs=256), device="cpu")
    head_learn = Learner(fdls, net.head, loss_func=CrossEntropyLossFlat(), metrics=accuracy)
    quiet_fastai_if_not_tty(head_learn)
    head_learn.fit_one_cycle(int(run.cfg["head_epochs"]), float(run.cfg["head_lr"]))


def stages(cfg: dict[str, Any]) -> list[tuple[int, int, float, int, bool]]:
    """The unfrozen epochs: (size, epochs, lr, groups trained, bf16) per stage; a second stage at
    `final_size` for profiles with progressive resizing."""
    size, lr = int(cfg["size"]), float(cfg["lr_max"])
    out = [(size, int(cfg["unfrozen_epochs"]), lr, int(cfg["unfreeze_groups"]), False)]
    final_size = int(cfg.get("final_size") or size)
    if final_size != size and int(cfg["final_epochs"]) > 0:
        # the larger size may train fewer groups: the lowest ones cost most at high resolution
        out.append((final_size, int(cfg["final_epochs"]), lr * float(cfg["final_lr_scale"]),
                    int(cfg["final_unfreeze_groups"]), bool(cfg["final_bf16"])))
    return out


def fine_tune(run: Run, net, cache: np.ndarray) -> list[dict[str, float]]:
    """Phase 2: the top backbone groups unfrozen, augmented films, discriminative LRs, one-cycle
    schedules, progressive resizing, weight EMA. -> (per-epoch history, the DVCLive run)."""
    import torch
    import fastai.callback.progress  # noqa: F401  (progress bars)
    import fastai.callback.schedule  # noqa: F401  (fit_one_cycle)
    from fastai.callback.core import Callback
    from fastai.callback.mixup import MixUp
    from fastai.learner import Learner
    from fastai.losses import CrossEntropyLossFlat, LabelSmoothingCrossEntropyFlat
    from fastai.metrics import accuracy

    from covid_cxr.model.callbacks import bf16_autocast, live_curves, weight_ema
    from covid_cxr.model.precision import cpu_has_bf16
    from covid_cxr.progress import quiet_fastai_if_not_tty

    cfg = run.cfg
    groups = net.body_groups()
    frozen: list = []

    class FrozenInEval(Callback):
        """Frozen groups stay in eval mode: BN statistics fixed, no backward through them."""

        def before_train(self):
            for g in frozen:
                g.eval()

    history: list[dict[str, float]] = []
    live, LiveCurves = live_curves(run.paths.train_curves)
    eps = float(cfg["label_smoothing"])
    loss_func = LabelSmoothingCrossEntropyFlat(eps=eps) if eps > 0 else CrossEntropyLossFlat()
    mix = float(cfg["mixup"])
    ema = weight_ema(net, float(cfg["ema"])) if float(cfg["ema"]) > 0 else None
    for st_size, epochs, st_lr, k, bf16 in stages(cfg):
        if bf16 and not cpu_has_bf16():
            typer.echo(f"  {st_size} px: this CPU has no native bfloat16, training in float32")
            bf16 = False
        if epochs <= 0:
            continue
        k = min(k, len(groups))
        frozen[:] = groups[: len(groups) - k]
        with _timed(f"unfrozen phase @ {st_size}px (top {k} of {len(groups)} groups, {epochs} epochs)", run.timings):
            st_cache = cache if st_size == int(cfg["size"]) else run.decoded(st_size)
            dls = image_dls(st_cache, run.labels, run.tr, run.va, cfg, run.norm, seed=int(cfg["seed"]) + st_size)
            cbs = [FrozenInEval(), LiveCurves(st_size)] + ([MixUp(mix)] if mix > 0 else [])
            cbs += [bf16_autocast()] if bf16 else []
            cbs += [ema] if ema is not None else []
            learn = Learner(dls, net, loss_func=loss_func, metrics=accuracy,
                            splitter=lambda m: m.param_groups(), train_bn=False, cbs=cbs)
            quiet_fastai_if_not_tty(learn)
            learn.freeze_to(-(k + 1))
            if cfg["compile"]:
                learn.model = torch.compile(learn.model)
            learn.fit_one_cycle(epochs, lr_max=slice(st_lr / float(cfg["lr_div"]), st_lr))
            for row in learn.recorder.values:
                history.append({"epoch": len(history), "size": st_size, "train_loss": float(row[0]),
                                "valid_loss": float(row[1]), "valid_accuracy": float(row[2])})
    if ema is not None:
        ema.apply()
    return history, live


def final_features(run: Run, net, cache: np.ndarray):
    """The trained body over train and valid at the final size, through the body answers go
    through (nets.InferenceBody, in the precision model.json records) -> (train, valid)
    referpolicy.Features: every threshold is fitted on the numbers the model will answer with."""
    import torch

    from covid_cxr.model.nets import inference_body
    from covid_cxr.model.referpolicy import Features

    net.eval()
    cl = run.channels_last
    body = inference_body(net, run.inference["bf16_from"], int(run.cfg.get("final_size") or run.cfg["size"]), cl)
    typer.echo(f"  answers in {run.inference['precision']}"
               + (f" from body module {run.inference['bf16_from']}" if run.inference["bf16_from"] is not None else ""))
    f_tr, s_tr = embeddings(body, cache[run.tr], run.norm, desc="final features (train)", channels_last=cl)
    f_va, s_va = embeddings(body, cache[run.va], run.norm, desc="final features (valid)", channels_last=cl)
    with torch.inference_mode():
        logits_va = net.head(f_va)
    return (Features(f_tr, s_tr, run.labels[run.tr]),
            Features(f_va, s_va, run.labels[run.va], logits_va))


def fit_gate(run: Run, cache: np.ndarray):
    """The input gate (model/inputgate.py) on the train films, its threshold on valid; None when
    params.yaml `train.input_gate` is null."""
    settings = run.cfg["input_gate"]
    if not settings:
        return None
    from covid_cxr.model.inputgate import fit_input_gate

    negatives = None
    if float(settings.get("outlier_exposure") or 0) > 0:
        from covid_cxr.model.inputgate import SIZE
        from covid_cxr.model.synthneg import generate

        negatives = lambda rng, n: generate(rng, n, SIZE)  # noqa: E731  (at the gate's own size: no resize)
    with _timed("input gate", run.timings):
        gate = fit_input_gate(run.images(cache, run.tr), run.images(cache, run.va), settings,
                              seed=int(run.cfg["seed"]), negatives=negatives, log=typer.echo)
        typer.echo(f"  input gate: threshold {gate.threshold:.3f} (valid {settings['quantile']} quantile)")
    return gate


def model_meta(run: Run, size: int, policy, history: list[dict[str, float]], min_side: int) -> dict[str, Any]:
    """model.json (modelmeta.py): a pure function of data, code and params."""
    return {
        "classes": list(CLASSES),
        "image_size": size,
        "input": {"min_side": min_side},
        "inference": run.inference,
        "normalize": {"mean": list(run.norm.mean), "std": list(run.norm.std)},
        **policy.meta(),
        "data_md5": data_md5(run.paths.root),
        "params": run.cfg,
        "params_hash": params_hash(run.cfg),
        "n_train": int(len(run.tr)),
        "n_valid": int(len(run.va)),
        "history": history,
    }


def import_training_stack() -> None:
    """Import fastai and the training helpers before the seeds are set: importing them consumes
    random numbers, so importing them later would give other weights from the same seed."""
    import warnings

    # fastai 2.8.12's layers.py calls torch.jit.script at import, which torch 2.14 deprecates:
    # a library's warning about its own code, printed at the top of every training log
    warnings.filterwarnings("ignore", message=r"`torch\.jit\.script` is deprecated", category=FutureWarning)
    import fastai.callback.core  # noqa: F401
    import fastai.callback.mixup  # noqa: F401
    import fastai.callback.progress  # noqa: F401
    import fastai.callback.schedule  # noqa: F401
    import fastai.data.core  # noqa: F401
    import fastai.data.load  # noqa: F401
    import fastai.learner  # noqa: F401
    import fastai.losses  # noqa: F401
    import fastai.metrics  # noqa: F401

    import covid_cxr.data.cache  # noqa: F401
    import covid_cxr.model.callbacks  # noqa: F401


def train(paths: Paths | None = None, params: dict[str, Any] | None = None) -> dict[str, Any]:
    """Train the body and head, fit the refer policy, write artifacts/model. -> model.json's content."""
    from covid_cxr.model.checkpoint import save_model
    from covid_cxr.model.referpolicy import fit_refer_policy

    import_training_stack()

    paths = paths or Paths()
    params = params if params is not None else load_params(paths.root / "params.yaml")
    t0 = time.perf_counter()
    run = start_run(paths, params)
    size = int(run.cfg["size"])
    with _timed("decode cache", run.timings):
        cache = run.decoded(size)
    net = build_net(run)
    with _timed("frozen phase (cached features)", run.timings):
        fit_frozen_head(run, net, cache)
    history, live = fine_tune(run, net, cache)
    final_size = int(run.cfg.get("final_size") or size)
    if final_size != size:
        cache, size = run.decoded(final_size), final_size
    with _timed("calibration + novelty fit", run.timings):
        train_f, valid_f = final_features(run, net, cache)
        policy = fit_refer_policy(train_f, valid_f, calibration=run.cfg["calibration"], verdict=params["verdict"],
                                  clean_head=run.cfg["clean_head"])
        if policy.clean is not None:
            head_acc = float((policy.calibration.probs(valid_f.logits).argmax(1) == valid_f.labels).mean())
            typer.echo(f"  clean head on {'+'.join(policy.clean.inputs)}: L2 {policy.clean.l2:g}, "
                       f"T {policy.clean.temperature:.3f} (lowest valid NLL of {len(policy.clean_rows)}); "
                       f"head alone valid acc {head_acc:.4f}")
    gate = fit_gate(run, cache)
    triage = params["verdict"]["triage"]
    policy.fit_triage(float(triage["miss_cost"]), float(triage["max_referred"]),
                      None if gate is None else gate.flags(cache[run.va])[1])
    typer.echo(f"  triage: refer a non-COVID answer over P(COVID) {policy.covid_triage:.3f} "
               f"(valid silent COVID misses {policy.triage_point['silent_miss']:.4f}, "
               f"referred {policy.triage_point['referred']:.4f})")
    meta = model_meta(run, size, policy, history, int(params["validate"]["min_side"]))
    save_model(net, meta, paths.model_dir, ood=policy.novelty, clean=policy.clean, gate=gate)
    live.summary["final"] = {"valid_accuracy": policy.valid_accuracy,
                             "temperature": policy.calibration.temperature}  # after calibration
    live.end()
    total = time.perf_counter() - t0
    record_run(paths.root, "train", run.timings, total)
    typer.secho(f"✔ model -> {paths.model_dir}  valid acc {policy.valid_accuracy:.4f}  "
                f"T={policy.calibration.temperature:.3f}  novelty threshold {policy.novelty.threshold:.2f}  "
                f"min confidence {policy.min_confidence:.3f}  ({total:.0f} s)", fg=typer.colors.GREEN)
    return meta


def register(app: typer.Typer, data_app: typer.Typer) -> None:
    @app.command("train")
    def train_cmd(
        profile: str = typer.Option(None, help="Override train.profile (cpu | full | smoke)."),
    ) -> None:
        """Train the classifier on the prepared split -> artifacts/model/ (weights-only)."""
        paths = Paths()
        params = load_params(paths.root / "params.yaml")
        if profile:
            params["train"]["profile"] = profile
        train(paths, params)
