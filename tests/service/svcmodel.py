"""A small but real model for the service tests (the trained artifact is not needed).

ImageNet-pretrained mobilenet_v2 from the offline wheel, a head fitted for a few
steps on pooled features of a handful of real X-rays (the first files of each class
of ../shared/incoming/batch-001), and an OOD model fitted on those same features.
Saved with `model_io.save_model`, exactly like `train` does. Seconds on a CPU.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from covid_cxr.config import CLASSES

from imgfactory import BATCH_001 as INCOMING  # $COVID_CXR_SHARED or <repo>/../shared


def real_images(n_per_class: int) -> list[tuple[Path, int]]:
    """The first n images of each class of the incoming batch (else of data/, if pulled)."""
    from covid_cxr.config import Paths

    out: list[tuple[Path, int]] = []
    for ci, c in enumerate(CLASSES):
        d = INCOMING / c
        if not d.is_dir():
            d = Paths().dataset / c / "images"
        files = sorted(d.glob("*.png"))[:n_per_class]
        if not files:
            raise FileNotFoundError(f"no images for class {c} in {d}")
        out += [(f, ci) for f in files]
    return out


def build_test_model(out_dir: Path, image_size: int = 96, n_per_class: int = 12, seed: int = 0,
                     clean_head: bool = True) -> Path:
    """A small real model shaped as `train` ships one: trained head, novelty bank and (by default) a clean head."""
    import torch

    from covid_cxr.model import checkpoint as model_io, nets as models
    from covid_cxr.data.preprocess import load_gray

    torch.manual_seed(seed)
    out_dir = Path(out_dir)
    net = models.build("mobilenet_v2", pretrained=True).eval()
    items = real_images(n_per_class)
    grays = np.stack([load_gray(p, image_size) for p, _ in items])
    labels = np.array([y for _, y in items])
    meta = {
        "image_size": image_size,
        "normalize": {"mean": list(models.IMAGENET.mean), "std": list(models.IMAGENET.std)},
        "temperature": 1.5,
        "class_bias": None,
        "verdict": {"min_confidence": 0.0, "covid_triage": None},
        "input": {"min_side": 64},      # params.yaml validate.min_side, as train records it
        "inference": inference(),       # params.yaml train.inference, as train records it on this machine
    }
    lm = model_io.LoadedModel(net=net, meta=meta, channels_last=False)
    with torch.no_grad():
        feats = net.features(lm.to_input(grays))
    # A few full-batch steps on the head only: enough for non-trivial outputs.
    head = net.head
    head.train()
    opt = torch.optim.Adam(head.parameters(), lr=3e-3)
    y = torch.as_tensor(labels)
    for _ in range(40):
        opt.zero_grad()
        loss = torch.nn.functional.cross_entropy(head(feats), y)
        loss.backward()
        opt.step()
    head.eval()
    # Threshold a little above the fitted images' own scores: those are in distribution by
    # construction, and synthetic non-X-rays score well above it (checked by the fixtures).
    ood = model_io.OodModel.fit(feats.numpy(), labels, n_components=32)
    ood.threshold = float(ood.score(feats).max() * 1.2)
    meta.update(
        {
            "data_md5": "0123456789abcdef0123456789abcdef.dir",
            "git_sha": "feedc0de" * 5,
            "params": {"arch": "mobilenet_v2", "size": image_size, "profile": "test"},
            "trained_at": "2024-01-01T00:00:00+00:00",
        }
    )
    clean = None
    if clean_head:
        from covid_cxr.model.cleanhead import fit_clean_head

        with torch.no_grad():
            _, style = net.embed(lm.to_input(grays))
        both = {"content": feats.numpy(), "style": style.numpy()}   # as the pipeline's clean head reads
        clean, _ = fit_clean_head(both, labels, both, labels, [0.01], len(CLASSES), inputs=["content", "style"])
    model_io.save_model(net, meta, out_dir, ood=ood, clean=clean)
    return out_dir


def metrics(accuracy: float = 0.98, macro_f1: float = 0.975, covid_recall: float = 0.98) -> dict:
    return {
        "accuracy": accuracy,
        "macro_f1": macro_f1,
        "covid_recall": covid_recall,
        "covid_specificity": 0.99,
        "ece_before": 0.04,
        "ece_after": 0.015,
        "per_class": {c: {"precision": 0.98, "recall": 0.98, "f1": 0.98, "support": 100} for c in CLASSES},
        "roc_auc": {c: 0.995 for c in CLASSES},
        "ood_false_flag_rate": 0.01,
        "n_test": 300,
    }


def inference() -> dict:
    """The precision `covid-cxr train` would fit a model in on this machine (model/precision.py)."""
    import yaml

    from covid_cxr.model.precision import fit_inference

    params = yaml.safe_load((Path(__file__).resolve().parents[2] / "params.yaml").read_text())
    return fit_inference(params["train"]["inference"])


def write_project(root: Path, model_src: Path | None = None, passed: bool = True, **metric_kw) -> Path:
    """A minimal project tree: params.yaml, artifacts/model, eval/metrics.json, gate.json."""
    import shutil

    root = Path(root)
    (root / "artifacts" / "eval").mkdir(parents=True, exist_ok=True)
    import yaml

    repo_params = yaml.safe_load((Path(__file__).resolve().parents[2] / "params.yaml").read_text())
    # the project's own serve settings: they become the Bento's arguments
    (root / "params.yaml").write_text(yaml.safe_dump({"train": {"profile": "smoke"}, "serve": repo_params["serve"]},
                                                     sort_keys=False))
    if model_src is not None:
        dst = root / "artifacts" / "model"
        if dst.exists():
            shutil.rmtree(dst)
        shutil.copytree(model_src, dst)
    m = metrics(**metric_kw)
    (root / "artifacts" / "eval" / "metrics.json").write_text(json.dumps(m, indent=2))
    # evaluate's test-split answers: packaged with the model as the monitor's reference
    (root / "artifacts" / "eval" / "predictions.csv").write_text(
        "path,label,pred,p_COVID,p_Normal,p_Viral Pneumonia,novelty,verdict,reason,width,height,mode\n"
        + "".join(f"data/{c}/{i}.png,{c},{c},0.9,0.05,0.05,0.5,ok,,256,256,L\n" for i, c in enumerate(CLASSES)))
    gate = {"passed": passed, "reasons": [] if passed else ["accuracy 0.5000 < 0.97"], "metrics": m, "champion": None}
    (root / "artifacts" / "gate.json").write_text(json.dumps(gate, indent=2))
    return root


PACKAGE_ONLY_DVC_YAML = """\
stages:
  package:
    cmd: covid-cxr package --if-passed
    deps: [artifacts/gate.json, artifacts/model]
    outs: [artifacts/bento.json]
"""


def init_repo(root: Path, remote: Path, env: dict, dvc_yaml: str | None = None) -> None:
    """Make a project tree (write_project) a git + DVC repo with a local DVC remote, as the
    release commands need (`promote` exports the Bento to the remote and commits the record)."""
    import subprocess
    import sys

    bindir = Path(sys.executable).parent

    def sh(*cmd: str) -> None:
        r = subprocess.run(list(cmd), cwd=root, env=env, capture_output=True, text=True, timeout=120)
        assert r.returncode == 0, f"{cmd}: {r.stdout}\n{r.stderr}"

    remote.mkdir(parents=True, exist_ok=True)
    sh("git", "-c", "init.defaultBranch=main", "init", "-q")
    sh("git", "config", "user.email", "service-tests@example.invalid")
    sh("git", "config", "user.name", "service tests")
    sh(str(bindir / "dvc"), "init", "-q")
    sh(str(bindir / "dvc"), "config", "core.analytics", "false")
    sh(str(bindir / "dvc"), "remote", "add", "-d", "local", str(remote))
    (root / ".gitignore").write_text("/artifacts/model/\n/artifacts/eval/\n/artifacts/gate.json\n")
    files = ["params.yaml", ".gitignore", ".dvc"]
    if dvc_yaml:
        (root / "dvc.yaml").write_text(dvc_yaml)
        files.append("dvc.yaml")
    sh("git", "add", *files)
    sh("git", "commit", "-qm", "project")
