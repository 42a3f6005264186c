"""Checkpoints round-trip, are replaced atomically, and bad ones are clear errors; the epoch loop
writes them every N steps, at epoch ends and on SIGTERM, and resumes from them exactly."""

import os
import signal

import pytest
import torch
from omegaconf import OmegaConf
from torch import nn
from torch.utils.data import TensorDataset

from framework.data import build_loader
from framework.errors import MPQError
from framework.models import create_model
from framework.track.aim_tracker import NullTracker
from framework.train.checkpoint import load_checkpoint, load_model_state, save_checkpoint
from framework.train.engine import FitPlan, Hook, Loaders, fit
from framework.train.resume import Interrupted
from framework.train.step import StepOutput

META = {"model": {"name": "resnet8", "num_classes": 10, "in_channels": 1, "options": {}}, "step": 3}


def test_round_trip_and_replace(tmp_path):
    model = create_model("resnet8", num_classes=10, in_channels=1)
    path = save_checkpoint(tmp_path / "last", model, META, training_state={"step": torch.tensor(3)})
    other = create_model("resnet8", num_classes=10, in_channels=1)
    ckpt = load_checkpoint(path, with_training_state=True)
    load_model_state(other, ckpt)
    for a, b in zip(model.state_dict().values(), other.state_dict().values(), strict=True):
        assert torch.equal(a, b)
    assert ckpt.meta["step"] == 3 and int(ckpt.training_state["step"]) == 3

    with torch.no_grad():
        model.fc.bias.add_(1.0)
    save_checkpoint(tmp_path / "last", model, {**META, "step": 4})
    again = load_checkpoint(tmp_path / "last")
    assert again.meta["step"] == 4
    assert torch.equal(again.model_state["fc.bias"], model.fc.bias)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["last"]  # no temporary or old copies left


def test_run_directory_resolves_to_its_last_checkpoint(tmp_path):
    model = create_model("resnet8", num_classes=10, in_channels=1)
    save_checkpoint(tmp_path / "checkpoints" / "last", model, META)
    assert load_checkpoint(tmp_path).path == tmp_path / "checkpoints" / "last"


def test_corrupt_weights_are_a_clear_error(tmp_path):
    path = save_checkpoint(tmp_path / "c", create_model("resnet8", num_classes=10, in_channels=1), META)
    (path / "model.pt").write_bytes(b"not a torch file")
    with pytest.raises(MPQError, match="corrupt"):
        load_checkpoint(path)


def test_corrupt_meta_is_a_clear_error(tmp_path):
    path = save_checkpoint(tmp_path / "c", create_model("resnet8", num_classes=10, in_channels=1), META)
    (path / "meta.json").write_text("{truncated")
    with pytest.raises(MPQError, match="corrupt"):
        load_checkpoint(path)


def test_missing_and_foreign_paths(tmp_path):
    with pytest.raises(MPQError, match="does not exist"):
        load_checkpoint(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(MPQError, match="not a checkpoint"):
        load_checkpoint(tmp_path / "empty")


def test_mismatched_model_names_the_tensors(tmp_path):
    path = save_checkpoint(tmp_path / "c", create_model("resnet8", num_classes=10, in_channels=1), META)
    with pytest.raises(MPQError, match="does not match the model.*missing"):
        load_model_state(create_model("resnet20", num_classes=10, in_channels=1), load_checkpoint(path))


# -- the epoch loop's checkpoints: every N steps, at epoch ends, on SIGTERM, and an exact resume --------------


class DropoutStep:
    """A training step whose result depends on the torch RNG (dropout), so a resume must restore it."""

    def __init__(self, model: nn.Module):
        self.model = model
        self.optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)

    def __call__(self, batch) -> StepOutput:
        x, y = batch
        out = self.model(x)
        loss = nn.functional.cross_entropy(out, y)
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self.optimizer.step()
        return StepOutput(loss.detach(), out.detach(), {"grad_norm": float(self.model[1].weight.grad.norm())})

    def state_dict(self) -> dict:
        return {"optimizer": self.optimizer.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        self.optimizer.load_state_dict(state["optimizer"])


class Recorder(NullTracker, Hook):
    """Tracker and hook at once: what was tracked, which steps and epochs the hooks saw; SIGTERM at `kill_at`."""

    def __init__(self, kill_at: int | None = None):
        self.tracked, self.steps, self.epochs, self.kill_at = [], [], [], kill_at

    def track(self, name, value, step=None, subset="train", **context):
        self.tracked.append((name, subset, step))

    def on_step(self, step, loss, top1, info):
        self.steps.append(step)
        if step == self.kill_at:
            os.kill(os.getpid(), signal.SIGTERM)

    def on_epoch_end(self, epoch, entry):
        self.epochs.append(epoch)
        entry["seen_by_hook"] = epoch


def _loaders() -> Loaders:
    g = torch.Generator().manual_seed(0)
    data = TensorDataset(torch.randn(40, 6, generator=g), torch.randint(0, 3, (40,), generator=g))
    cfg = OmegaConf.create({"loader": "torch", "num_workers": 0})
    return Loaders(build_loader(data, 8, True, cfg, seed=1), build_loader(data, 20, False, cfg))  # 5 steps an epoch


def _fit(directory, recorder: Recorder, resume: bool = False):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Dropout(0.5), nn.Linear(6, 3))
    step = DropoutStep(model)
    state = None
    if resume:
        ckpt = load_checkpoint(directory / "last", with_training_state=True)
        load_model_state(model, ckpt)
        step.load_state_dict(ckpt.training_state)
        state = ckpt.training_state
    saves = []

    def saver(path, meta, training_state):
        saves.append((path.name, meta["step"]))
        return save_checkpoint(path, model, meta, training_state)

    plan = FitPlan(10, torch.device("cpu"), directory, META, tracker=recorder, val_subset="proxy", checkpoint_every=3,
                   track_every=2, saver=saver)
    return model, fit(model, _loaders(), step, plan, hooks=[recorder], resume=state), saves


def test_fit_checkpoints_every_n_steps_and_at_epoch_ends_and_tracks_by_context(tmp_path):
    recorder = Recorder()
    _, result, saves = _fit(tmp_path, recorder)
    assert result.steps == 10 and [e["epoch"] for e in result.history] == [1, 2]
    assert [step for name, step in saves if name == "last"] == [3, 5, 6, 9, 10]  # mid-epoch at 3, 6, 9
    assert ("best", 5) in saves
    assert recorder.steps == list(range(1, 11)) and recorder.epochs == [1, 2]
    assert all(e["seen_by_hook"] == e["epoch"] for e in result.history)  # the hook's additions are kept
    train = {(name, step) for name, subset, step in recorder.tracked if subset == "train"}
    assert train == {(name, s) for s in (2, 4, 6, 8, 10) for name in ("loss", "top1", "grad_norm")}
    assert sorted((n, s) for n, subset, s in recorder.tracked if subset == "proxy") == [
        ("loss", 5), ("loss", 10), ("top1", 5), ("top1", 10)]


def test_sigterm_mid_epoch_then_resume_gives_the_uninterrupted_weights(tmp_path):
    reference, reference_result, _ = _fit(tmp_path / "reference", Recorder())
    with pytest.raises(Interrupted) as stopped:
        _fit(tmp_path / "run", Recorder(kill_at=7))
    assert stopped.value.step == 7 and stopped.value.signal_name == "SIGTERM"
    position = load_checkpoint(tmp_path / "run" / "last", with_training_state=True).training_state["position"]
    assert position == {"epoch": 2, "step_in_epoch": 2, "step": 7}

    recorder = Recorder()
    model, result, _ = _fit(tmp_path / "run", recorder, resume=True)
    assert recorder.steps == [8, 9, 10] and result.steps == 10
    for a, b in zip(model.state_dict().values(), reference.state_dict().values(), strict=True):
        assert torch.equal(a, b)
    assert result.final == reference_result.final and result.best == reference_result.best
    assert [e["val_top1"] for e in result.history] == [e["val_top1"] for e in reference_result.history]
