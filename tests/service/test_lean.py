"""Lean processes: the supervising `bentoml serve` process never loads torch, and the worker's code
paths (load, predict, explain, report) import no training stack (fastai, Great Expectations, DVC)."""
from __future__ import annotations

import json
import subprocess
import sys

import psutil
import pytest

from svckit import VENV_BIN

TRAINING_STACK = ("fastai", "fastcore", "great_expectations", "dvc", "dvclive", "sklearn.linear_model")


def mapped_libraries(pid: int) -> str:
    with open(f"/proc/{pid}/maps") as fh:
        return fh.read()


@pytest.mark.e2e
def test_the_supervisor_loads_no_torch_and_the_worker_does(server):
    supervisor = psutil.Process(server.proc.pid)           # `covid-cxr serve` execs `bentoml serve`
    assert "bentoml" in " ".join(supervisor.cmdline())
    workers = supervisor.children(recursive=True)
    assert workers, "no worker process"
    assert "libtorch_cpu" not in mapped_libraries(supervisor.pid)
    assert any("libtorch_cpu" in mapped_libraries(w.pid) for w in workers)   # the check can see torch


def test_the_worker_code_paths_import_no_training_stack(test_model_dir, tmp_path):
    """What the worker runs, in a fresh interpreter: the service module, the model, an answer, a
    Grad-CAM explanation and a report; then sys.modules holds none of the training stack."""
    code = f"""
import json, sys, threading
import numpy as np
from bentoml._internal.configuration.containers import BentoMLContainer
from covid_cxr.config import load_params, project_root
from covid_cxr.release.bentoargs import serve_params
BentoMLContainer.bento_arguments.set({{k: str(v) for k, v in
                                       serve_params(load_params(project_root() / "params.yaml")).items()}})
import covid_cxr.serve.service
supervisor_view = sorted(m for m in ("torch", "fastai") if m in sys.modules)
from covid_cxr.model.checkpoint import load_model
from covid_cxr.serve.answers import answer, cam_images
from covid_cxr.serve.report import build_report
m = load_model({str(test_model_dir)!r})
film = (np.random.default_rng(0).random((m.size, m.size)) * 255).astype(np.uint8)
pred = m.predict(film[None])
res = answer(pred, 0, "t")
shown, heat, method = cam_images(m, threading.Lock(), film, film, 0)
build_report(shown, heat, res, fmt="png", data_version=None, image_sha256="0" * 64, cam_method=method,
             disclaimer="x")
stack = {TRAINING_STACK!r}
print(json.dumps({{"supervisor": supervisor_view, "loaded": sorted(s for s in stack if s in sys.modules)}}))
"""
    r = subprocess.run([str(VENV_BIN / "python"), "-c", code], capture_output=True, text=True, timeout=300,
                       cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    out = json.loads(r.stdout.strip().splitlines()[-1])
    assert out["supervisor"] == [], out          # importing the service module loads neither
    assert out["loaded"] == [], out              # and answering loads no training stack
