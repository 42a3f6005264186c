"""A tracked stage run is read back through Aim's SDK, and `aim up` on 127.0.0.1 serves it."""

import json
import os
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
from aim import Repo

from tests.conftest import free_port, run_stage_in_process

AIM = str(Path(sys.executable).parent / "aim")


def _the_run(pretrained_run):
    info = pretrained_run["result"]["tracking"]
    assert info["enabled"] is True and info["repo"] == str(pretrained_run["aim_repo"])
    repo = Repo.from_path(str(pretrained_run["aim_repo"]))
    runs = {run.hash: run for run in repo.iter_runs()}
    assert info["run_hash"] in runs, sorted(runs)
    return runs[info["run_hash"]]


def test_run_is_found_by_the_sdk_with_hparams(pretrained_run):
    run = _the_run(pretrained_run)
    assert run.experiment == "mpq" and run.name == "pretrain"
    hparams = run["hparams"]
    assert hparams["model"]["name"] == "resnet8"
    assert hparams["data"]["fraction"] == 0.05
    assert hparams["train"]["epochs"] == 1
    assert hparams["stage"] == "pretrain"


def test_run_has_train_and_val_metrics_with_contexts(pretrained_run):
    run = _the_run(pretrained_run)
    series = {(m.name, m.context.to_dict().get("subset")): m.values.values_list() for m in run.metrics()}
    assert ("loss", "train") in series and ("top1", "train") in series
    history = pretrained_run["result"]["history"]
    assert series[("top1", "val")] == pytest.approx([entry["val_top1"] for entry in history])  # held-out train images
    assert series[("top1", "test")][-1] == pytest.approx(pretrained_run["result"]["metrics"]["top1"])
    assert not any(name.startswith("__system__") for name, _ in series)


def _get_json(url: str):
    with urllib.request.urlopen(url, timeout=5) as response:
        return json.loads(response.read())


def test_aim_up_serves_the_run_on_loopback(pretrained_run):
    port = free_port()
    server = subprocess.Popen(
        [AIM, "up", "--host", "127.0.0.1", "--port", str(port), "--repo", str(pretrained_run["aim_repo"])],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,  # its own process group: `aim up` leaves a uvicorn child behind otherwise
        env={**os.environ, "AIM_UI_TELEMETRY_ENABLED": "0"},
    )
    try:
        base = f"http://127.0.0.1:{port}/api"
        deadline = time.time() + 60
        while True:
            try:
                project = _get_json(f"{base}/projects/")
                break
            except OSError:
                if time.time() > deadline or server.poll() is not None:
                    raise
                time.sleep(0.5)
        assert project["telemetry_enabled"] in (0, False)
        run_hash = pretrained_run["result"]["tracking"]["run_hash"]
        info = _get_json(f"{base}/runs/{run_hash}/info/")
        assert info["props"]["experiment"]["name"] == "mpq"
        assert info["params"]["hparams"]["model"]["name"] == "resnet8"
        names = {(t["name"], t["context"].get("subset")) for t in info["traces"]["metric"]}
        assert ("top1", "val") in names
    finally:
        os.killpg(server.pid, signal.SIGTERM)
        try:
            server.wait(timeout=10)
        except subprocess.TimeoutExpired:
            os.killpg(server.pid, signal.SIGKILL)


def test_policy_plot_is_tracked_as_an_aim_image(tmp_path):
    import numpy as np
    from aim.storage.context import Context
    from PIL import Image

    repo = tmp_path / "aim"
    run_hash = run_stage_in_process("cost", tmp_path / "run", "model=resnet8", "input_size=28", "in_channels=1",
                                    "policy=uniform:4/4", f"tracking.repo={repo}")["tracking"]["run_hash"]
    run = {r.hash: r for r in Repo.from_path(str(repo)).iter_runs()}[run_hash]
    images = run.get_image_sequence("policy", Context({"subset": "val"}))
    assert list(images.data.indices()) == [0]  # the step the plot was tracked at
    (image,) = images.values.values_list()
    tracked, written = image.to_pil_image().convert("RGB"), Image.open(tmp_path / "run" / "policy.png").convert("RGB")
    assert tracked.size == written.size and np.array_equal(np.asarray(tracked), np.asarray(written))  # the plot beside policy.json
