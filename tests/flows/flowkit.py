"""Helpers for the retraining-flow tests and bench/bench_flow.py: temp DVC+git projects with a
small real data subset, fake stages, incoming batches with broken files, Prefect API queries."""
from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

MAIN = Path(__file__).resolve().parents[2]
HERE = Path(__file__).resolve().parent
VENV_BIN = Path(sys.executable).parent
DATASET = MAIN / "data" / "COVID-19_Radiography_Dataset"
SHARED = Path(os.environ.get("COVID_CXR_SHARED", MAIN.parent / "shared")).resolve()
INCOMING = SHARED / "incoming" / "batch-001"
CLASSES = ("COVID", "Normal", "Viral Pneumonia")

sys.path.insert(0, str(MAIN / "flows"))  # `import retrain`, `import deploy`, as the scripts do

FAKE_DVC_YAML = """\
stages:
  prepare:
    cmd: {py} fake_stages.py prepare
    deps: [data, fake_stages.py]
    outs: [artifacts/data/manifest.csv]
  validate:
    cmd: {py} fake_stages.py validate
    deps: [artifacts/data/manifest.csv]
    outs: [artifacts/validation/docs]
    metrics:
      - artifacts/validation/summary.json:
          cache: false
  train:
    cmd: {py} fake_stages.py train
    deps: [artifacts/data/manifest.csv, artifacts/validation/summary.json]
    outs: [artifacts/model]
  evaluate:
    cmd: {py} fake_stages.py evaluate
    deps: [artifacts/model]
    params: [fake]
    metrics:
      - artifacts/eval/metrics.json:
          cache: false
  gate:
    cmd: {py} fake_stages.py gate
    deps: [artifacts/eval/metrics.json]
    params: [gate]
    metrics:
      - artifacts/gate.json:
          cache: false
"""

GOOD_METRICS = {"accuracy": 0.95, "macro_f1": 0.94, "covid_recall": 0.96, "covid_specificity": 0.97,
                "ece_before": 0.05, "ece_after": 0.02, "ood_false_flag_rate": 0.01, "n_test": 12}
LOOSE_GATE = {"min_accuracy": 0.0, "min_macro_f1": 0.0, "min_covid_recall": 0.0, "max_ece": 1.0,
              "champion_tolerance": 0.005}
STRICT_GATE = {"min_accuracy": 0.999, "min_macro_f1": 0.999, "min_covid_recall": 0.999, "max_ece": 0.001,
               "champion_tolerance": 0.0}


# What a 60-image project needs to get through `validate` (the real thresholds assume thousands).
SMALL_PARAMS = {
    "validate": {
        "min_per_class": 5,
        "class_fraction": {"COVID": [0.0, 1.0], "Normal": [0.0, 1.0], "Viral Pneumonia": [0.0, 1.0]},
        "split_tolerance": 0.2,
    },
}


def stop_group(proc: subprocess.Popen, sig: int = signal.SIGTERM, grace: float = 20) -> None:
    """Stop a process started with start_new_session=True, and everything it started."""
    if proc.poll() is not None:
        return
    try:
        os.killpg(proc.pid, sig)
        proc.wait(timeout=grace)
    except (ProcessLookupError, subprocess.TimeoutExpired):
        pass
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)



def sh(cmd: list[str], cwd: Path, env: dict[str, str] | None = None, timeout: float = 300) -> str:
    r = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    if r.returncode != 0:
        raise AssertionError(f"{cmd} exited {r.returncode}\n{r.stdout[-3000:]}\n{r.stderr[-3000:]}")
    return r.stdout


def deep_update(d: dict, u: dict) -> dict:
    for k, v in u.items():
        if isinstance(v, dict) and isinstance(d.get(k), dict):
            deep_update(d[k], v)
        else:
            d[k] = v
    return d


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def tree_files(root: Path) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


@dataclass
class Project:
    root: Path
    remote: Path
    bin: Path
    env: dict[str, str] = field(default_factory=dict)  # PATH with the fakes first

    @property
    def production(self) -> Path:
        return self.root / "registry" / "production.json"

    @property
    def ledger(self) -> Path:
        return self.root / "registry" / "inbox-ledger.json"

    def git(self, *args: str) -> str:
        return sh(["git", *args], self.root, env=self.env)

    def images(self) -> dict[str, set[str]]:
        """class -> file names under data/."""
        return {c: {p.name for p in (self.root / "data" / DATASET.name / c / "images").glob("*")} for c in CLASSES}

    def dvc(self, *args: str) -> str:
        return sh([str(VENV_BIN / "dvc"), *args], self.root, env=self.env)

    def set_params(self, update: dict[str, Any]) -> None:
        p = self.root / "params.yaml"
        p.write_text(yaml.safe_dump(deep_update(yaml.safe_load(p.read_text()), update), sort_keys=False))

    def seed_champion(self, metrics: dict[str, Any]) -> bytes:
        rec = {"bento": "covid_cxr:champion", "model": "covid_cxr_model:champion", "model_path": "",
               "metrics": metrics, "promoted_at": "2024-01-01T00:00:00"}
        self.production.parent.mkdir(parents=True, exist_ok=True)
        self.production.write_text(json.dumps(rec, indent=2))
        return self.production.read_bytes()


EXTERNAL = MAIN / "external"


def _copy_external(dst: Path, per_group: int = 2) -> None:
    """A few films of each external group (external/labels.csv), for the `external` stage."""
    import csv

    with open(EXTERNAL / "labels.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert rows, f"need the external films at {EXTERNAL} (dvc pull external.dvc)"
    keep, seen = [], {}
    for r in rows:
        if seen.get(r["group"], 0) < per_group:
            seen[r["group"]] = seen.get(r["group"], 0) + 1
            keep.append(r)
            (dst / r["file"]).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(EXTERNAL / r["file"], dst / r["file"])
    with open(dst / "labels.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(keep)


def _copy_subset(dst_data: Path, per_class: int) -> None:
    for cls in CLASSES:
        src = sorted((DATASET / cls / "images").glob("*.png"))[:per_class]
        assert len(src) == per_class, f"need {per_class} real images of {cls} under {DATASET} (dvc pull)"
        out = dst_data / DATASET.name / cls / "images"
        out.mkdir(parents=True)
        for p in src:
            shutil.copy2(p, out / p.name)


def make_project(base: Path, *, kind: str = "fake", per_class: int = 4, params: dict | None = None) -> Project:
    """A git + DVC project with a small real data subset, versioned and pushed to a temp remote.

    kind="fake": dvc.yaml runs tests/flows/fake_stages.py (milliseconds per stage), and a fake
    `covid-cxr` (package/promote) is first on PATH. kind="real": the real dvc.yaml, params,
    bentofile and src/ (the real `covid-cxr` chain, smoke profile).
    """
    root, remote, bindir = base / "proj", base / "remote", base / "bin"
    for d in (root, remote, bindir):
        d.mkdir(parents=True)
    _copy_subset(root / "data", per_class)
    prm = yaml.safe_load((MAIN / "params.yaml").read_text())
    if kind == "fake":
        shutil.copy2(HERE / "fake_stages.py", root / "fake_stages.py")
        (root / "dvc.yaml").write_text(FAKE_DVC_YAML.format(py=sys.executable))
        prm["fake"] = {"metrics": dict(GOOD_METRICS)}
        prm["gate"] = dict(LOOSE_GATE)
        fake_cli = bindir / "covid-cxr"
        fake_cli.write_text(f'#!/bin/sh\nexec "{sys.executable}" "{HERE / "fake_stages.py"}" --cli "$@"\n')
        fake_cli.chmod(0o755)
    else:
        shutil.copy2(MAIN / "dvc.yaml", root / "dvc.yaml")
        for extra in ("bentofile.yaml",):
            if (MAIN / extra).exists():
                shutil.copy2(MAIN / extra, root / extra)
        shutil.copytree(MAIN / "src", root / "src", ignore=shutil.ignore_patterns("__pycache__", "*.egg-info"))
        _copy_external(root / "external")
        prm["train"]["profile"] = "smoke"
        prm["gate"] = dict(LOOSE_GATE)
    deep_update(prm, params or {})
    (root / "params.yaml").write_text(yaml.safe_dump(prm, sort_keys=False))
    (root / ".gitignore").write_text("/artifacts/quarantine/\n/.bentos/\n/logs/\n"
                                     "/HOLD_TRAIN\n/.train_started\n/artifacts/bento.json\n/.cache/\n")

    env = dict(os.environ)
    env["PATH"] = os.pathsep.join([str(bindir), str(VENV_BIN), env.get("PATH", "")])
    env["COVID_CXR_ROOT"] = str(root)
    env["BENTOML_HOME"] = str(base / "bentoml")  # a temp model/Bento store
    env["BENTOML_DO_NOT_TRACK"] = "true"
    proj = Project(root=root, remote=remote, bin=bindir, env=env)
    git = ["git", "-c", "init.defaultBranch=main"]
    sh([*git, "init", "-q"], root)
    sh(["git", "config", "user.email", "flow-tests@example.invalid"], root)
    sh(["git", "config", "user.name", "flow tests"], root)
    proj.dvc("init", "-q")
    proj.dvc("config", "core.analytics", "false")
    proj.dvc("remote", "add", "-d", "local", str(remote))
    proj.dvc("add", "-q", "data")
    sh(["git", "add", "-A"], root)
    sh(["git", "commit", "-qm", "project"], root)
    proj.dvc("push", "-q")
    return proj


def flaky_dvc(proj: Project, fails: int) -> Path:
    """Put a `dvc` first on PATH whose first `fails` pulls fail like a dropped connection."""
    counter = proj.root.parent / "pull_attempts"
    script = proj.bin / "dvc"
    script.write_text(
        "#!/bin/sh\n"
        'if [ "$1" = pull ]; then\n'
        f'  n=$(cat "{counter}" 2>/dev/null || echo 0); n=$((n+1)); echo $n > "{counter}"\n'
        f'  if [ $n -le {fails} ]; then echo "ERROR: unexpected error - connection reset by peer (simulated)" >&2; exit 1; fi\n'
        "fi\n"
        f'exec "{VENV_BIN / "dvc"}" "$@"\n'
    )
    script.chmod(0o755)
    return counter


def make_batch(base: Path, *, good_per_class: int = 2, bad: bool = True, offset: int = 0,
               name: str = "batch-test") -> tuple[Path, dict[str, set[str]], set[str]]:
    """An incoming batch (flat `<Class>/*.png`): real unseen scans from the shared batch, plus broken files.

    Returns (batch dir, class -> good file names, bad relative paths).
    """
    batch = base / name
    good: dict[str, set[str]] = {}
    for cls in CLASSES:
        src = sorted((INCOMING / cls).glob("*.png"))[offset:offset + good_per_class]
        assert len(src) == good_per_class, f"need the shared incoming batch at {INCOMING}"
        (batch / cls).mkdir(parents=True)
        for p in src:
            shutil.copy2(p, batch / cls / p.name)
        good[cls] = {p.name for p in src}
    bad_files: set[str] = set()
    if bad:
        sample = next(iter(sorted((INCOMING / "COVID").glob("*.png")))).read_bytes()
        broken = {
            "COVID/empty-scan.png": b"",
            "Normal/notes.png": b"this is a text file, not an X-ray\n",
            "Viral Pneumonia/truncated-scan.png": sample[: len(sample) // 3],
        }
        for rel, data in broken.items():
            (batch / rel).write_bytes(data)
        bad_files = set(broken)
    return batch, good, bad_files


# ------------------------------------------------------------------------------------------------
# Prefect API queries
# ------------------------------------------------------------------------------------------------
def api(url: str, method: str, path: str, body: Any = None) -> Any:
    import httpx

    r = httpx.request(method, url.rstrip("/") + path, json=body, timeout=30)
    r.raise_for_status()
    return r.json()


def task_runs(url: str, flow_run_id: str) -> list[dict]:
    return api(url, "POST", "/task_runs/filter", {"flow_runs": {"id": {"any_": [str(flow_run_id)]}}})


def summary_artifacts(url: str, flow_run_id: str) -> list[dict]:
    arts = api(url, "POST", "/artifacts/filter", {"flow_runs": {"id": {"any_": [str(flow_run_id)]}}})
    return [a for a in arts if a.get("type") == "markdown" and a.get("key") == "retrain-summary"]


def wait_for(pred, timeout: float, what: str, interval: float = 0.5):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        v = pred()
        if v:
            return v
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout:.0f}s waiting for {what}")


def failure_artifacts(url: str, flow_run_id: str) -> list[dict]:
    arts = api(url, "POST", "/artifacts/filter", {"flow_runs": {"id": {"any_": [str(flow_run_id)]}}})
    return [a for a in arts if a.get("type") == "markdown" and a.get("key") == "retrain-failure"]


# ------------------------------------------------------------------------------------------------
# prefect.yaml deployments (the project's one way to deploy) and a process worker
# ------------------------------------------------------------------------------------------------
POOL = "covid-cxr-process"


def deploy_project(root: Path, env: dict[str, str], log_path: Path) -> subprocess.Popen:
    """What the README tells an operator to run in a checkout: the work pool, `prefect deploy --all`
    from prefect.yaml (copied into `root` with flows/, as a checkout has them), and a process worker
    (returned; stop it with stop_group). `env` holds PREFECT_API_URL and the project's settings."""
    shutil.copy2(MAIN / "prefect.yaml", root / "prefect.yaml")
    if not (root / "flows").exists():
        shutil.copytree(MAIN / "flows", root / "flows", ignore=shutil.ignore_patterns("__pycache__"))
    prefect = str(VENV_BIN / "prefect")
    env = {**env, "PREFECT_WORKER_QUERY_SECONDS": "2", "PREFECT_WORKER_PREFETCH_SECONDS": "5"}
    r = subprocess.run([prefect, "work-pool", "create", POOL, "--type", "process"], cwd=root, env=env,
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0 or "already exists" in r.stdout + r.stderr, r.stdout + r.stderr
    sh([prefect, "--no-prompt", "deploy", "--all"], root, env=env, timeout=300)
    log = open(log_path, "w")
    return subprocess.Popen([prefect, "worker", "start", "--pool", POOL, "--type", "process"], cwd=root, env=env,
                            stdout=log, stderr=subprocess.STDOUT, start_new_session=True)


def run_deployment_now(url: str, name: str, parameters: dict | None = None) -> str:
    """`prefect deployment run NAME` (as the README shows), through the API; -> the flow run id."""
    from prefect.deployments import run_deployment
    from prefect.settings import PREFECT_API_URL, temporary_settings

    with temporary_settings(updates={PREFECT_API_URL: url}):
        return str(run_deployment(name, parameters=parameters or {}, timeout=0, as_subflow=False).id)


def wait_run(url: str, run_id: str, timeout: float = 600) -> dict:
    def finished():
        run = api(url, "GET", f"/flow_runs/{run_id}")
        return run if run["state_type"] in {"COMPLETED", "FAILED", "CRASHED", "CANCELLED"} else None

    return wait_for(finished, timeout, f"flow run {run_id} to finish", interval=2)
