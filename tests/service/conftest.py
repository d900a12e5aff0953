"""Fixtures for the service tests.

One session builds a small real model (tests/service/svcmodel.py), packages it with the real
`covid-cxr package` into a temporary BENTOML_HOME (model store + `bentoml build`), and runs the
production Bento with the real `covid-cxr serve` (which execs `bentoml serve <bento tag>`) on a
free loopback port, with an API token. Every e2e test talks to that one server over HTTP.
"""
from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))          # svcmodel, svcfiles, svckit
sys.path.insert(0, str(HERE.parent))   # imgfactory (shared test helpers)

import svcmodel  # noqa: E402

from svckit import TOKEN, VENV_BIN, base_env, free_port, run_cli  # noqa: E402,F401


@dataclass
class Server:
    url: str
    proc: subprocess.Popen
    log: Path
    bento: str
    model: str
    model_dir: Path
    root: Path
    env: dict

    def client(self, token: str | None = TOKEN, **kw) -> httpx.Client:
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        return httpx.Client(base_url=self.url, headers=headers, timeout=kw.pop("timeout", 60), **kw)

    def alive(self) -> bool:
        return self.proc.poll() is None

    def log_tail(self, n: int = 4000) -> str:
        try:
            return self.log.read_text(errors="replace")[-n:]
        except OSError:
            return ""


@pytest.fixture(scope="session")
def service_tmp(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("service")


@pytest.fixture(scope="session")
def bentoml_home(service_tmp) -> Path:
    d = service_tmp / "bentoml"
    d.mkdir()
    return d


@pytest.fixture(scope="session")
def test_model_dir(service_tmp) -> Path:
    return svcmodel.build_test_model(service_tmp / "test-model", image_size=96)


@pytest.fixture(scope="session")
def train_images() -> list[Path]:
    """Real X-rays the test model was fitted on: in distribution by construction."""
    return [p for p, _ in svcmodel.real_images(12)]


@pytest.fixture(scope="session")
def packaged(service_tmp, bentoml_home, test_model_dir) -> dict:
    """A project whose gate passed (a git + DVC repo), packaged and promoted by the real CLI."""
    root = svcmodel.write_project(service_tmp / "proj", test_model_dir, passed=True)
    env = base_env(bentoml_home, root)
    svcmodel.init_repo(root, service_tmp / "proj-dvc-remote", env)
    r = run_cli(["package"], root, env)
    assert r.returncode == 0, f"covid-cxr package failed:\n{r.stdout}\n{r.stderr}"
    import json

    rec = json.loads((root / "artifacts" / "bento.json").read_text())
    assert not (root / "registry" / "production.json").exists()  # packaging never promotes
    p = run_cli(["promote"], root, env)
    assert p.returncode == 0, f"covid-cxr promote failed:\n{p.stdout}\n{p.stderr}"
    prod = json.loads((root / "registry" / "production.json").read_text())
    assert prod["bento"] == rec["bento"]
    return {"root": root, "env": env, "bento": rec["bento"], "model": rec["model"], "record": rec,
            "stdout": r.stdout}


@pytest.fixture(scope="session")
def server(packaged, service_tmp, test_model_dir) -> Server:
    """`covid-cxr serve --port N` of the production Bento, with an API token."""
    port = free_port()
    env = dict(packaged["env"])
    env.update({"COVID_CXR_API_TOKEN": TOKEN, "COVID_CXR_TORCH_THREADS": "1"})
    log = service_tmp / "server.log"
    fh = open(log, "wb")
    proc = subprocess.Popen([str(VENV_BIN / "covid-cxr"), "serve", "--port", str(port)], cwd=packaged["root"],
                            env=env, stdout=fh, stderr=subprocess.STDOUT, start_new_session=True)
    srv = Server(f"http://127.0.0.1:{port}", proc, log, packaged["bento"], packaged["model"],
                 test_model_dir, packaged["root"], env)
    deadline = time.monotonic() + 150
    try:
        while True:
            if not srv.alive():
                raise RuntimeError(f"the server exited ({proc.returncode}):\n{srv.log_tail()}")
            try:
                if httpx.get(f"{srv.url}/readyz", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError(f"the server was not ready within 150 s:\n{srv.log_tail()}")
            time.sleep(0.5)
        yield srv
    finally:
        _stop(proc)
        fh.close()


def _stop(proc: subprocess.Popen) -> None:
    if proc.poll() is not None:
        return
    try:
        os.killpg(proc.pid, signal.SIGTERM)  # its own session: the server and its workers only
        proc.wait(timeout=20)
    except (ProcessLookupError, subprocess.TimeoutExpired):
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        proc.wait(timeout=10)


@pytest.fixture
def api(server) -> httpx.Client:
    with server.client() as c:
        yield c


@pytest.fixture(scope="session")
def files(service_tmp, train_images) -> dict[str, Path]:
    """Every upload the tests send, written once."""
    import imgfactory as F
    import svcfiles as I

    d = service_tmp / "files"
    d.mkdir()
    xray = train_images[0]
    out = {
        "xray": Path(shutil.copy2(xray, d / xray.name)),
        # valid, unusual
        "png16": F.png16(d / "sixteen.png"),
        "rgba": I.rgba_png(d / "rgba.png", xray),
        "cmyk": I.cmyk_jpeg(d / "cmyk.jpg", xray),
        "jpeg": I.jpeg(d / "upright.jpg", xray),
        "exif": I.exif_rotated_jpeg(d / "exif6.jpg", xray),
        "progressive": I.progressive_jpeg(d / "progressive1024.jpg", xray),
        "ood": I.ood_png(d / "noise.png"),
        "colour_photo": I.colour_photo(d / "photo.jpg"),
        "grey_photo": I.grey_photo(d / "photo_grey.png"),
        "blank": I.blank_frame(d / "blank.png"),
        "gradient": I.colour_gradient(d / "gradient.png"),
        # bad
        "truncated": F.truncated(d / "truncated.png"),
        "truncated_jpeg": I.truncated_jpeg(d / "truncated.jpg", xray),
        "corrupt": I.corrupt_png(d / "corrupt.png"),
        "zero": F.zero_bytes(d / "zero.png"),
        "text": F.text_file(d / "notes.txt"),
        "text_as_png": F.text_file(d / "notes.png", "this is not a PNG\n" * 20),
        "svg": I.svg(d / "drawing.svg"),
        "pdf": I.pdf(d / "report.pdf"),
        "gif": I.animated_gif(d / "cine.gif", xray),
        "bomb": I.zlib_bomb_png(d / "bomb144mp.png"),
        "bomb_header": F.huge_dims(d / "bomb900mp.png"),
        "oversized": I.oversized(d / "big.bin"),
    }
    return out
