"""Checkpoints round-trip, are replaced atomically, and bad ones are clear errors."""

import pytest
import torch

from framework.errors import MPQError
from framework.models import create_model
from framework.train.checkpoint import load_checkpoint, load_model_state, save_checkpoint

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
