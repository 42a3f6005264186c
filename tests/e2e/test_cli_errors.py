"""Errors of the command line itself (an unknown key, bad override syntax, an unknown config-group
option) are one line `mpq <stage>: error: ...` with exit status 2, name the key and the key that
was probably meant, and start nothing: no run directory is created."""

import pytest

from launchers.cli import check_overrides
from tests.conftest import assert_one_error_line, run_mpq


@pytest.mark.parametrize(
    ("args", "fragments"),
    [
        (["train.epochz=2"], ["unknown key 'train.epochz'", "did you mean 'train.epochs'?"]),
        (["epochs=2"], ["unknown key 'epochs'", "did you mean 'train.epochs'?"]),
        (["train.epochs=[1,"], ["cannot parse the override 'train.epochs=[1,'"]),
        (["model=resnet9"], ["unknown model 'resnet9'", "did you mean 'model=resnet8'?", "conf/model/"]),
        (["--multirun", "search.lr_logitz=0.1,0.2"], ["unknown key 'search.lr_logitz'", "did you mean 'search.lr_logits'?"]),
    ],
    ids=["mistyped-key", "key-without-its-group", "bad-syntax", "unknown-group-option", "mistyped-sweep-key"],
)
def test_command_line_error_is_one_line_and_starts_nothing(tmp_path, args, fragments):
    run_dir = tmp_path / "run"
    proc = run_mpq("pretrain", *args, f"hydra.run.dir={run_dir}", f"hydra.sweep.dir={tmp_path / 'sweep'}")
    assert_one_error_line(proc, "pretrain", *fragments)
    assert not run_dir.exists() and not (tmp_path / "sweep").exists()


@pytest.mark.parametrize(
    ("overrides", "fragment"),
    [
        (["+train.epochs=3"], "cannot apply the overrides (Could not append to config"),
        (["~train.nothing_here"], "cannot apply the overrides"),
        (["data.fraction=0.1", "train.epochz=1"], "unknown key 'train.epochz'"),
        (["experiment=smoke", "finetune.max_stepz=3"], "did you mean 'finetune.max_steps'?"),
    ],
)
def test_check_overrides_names_the_problem(overrides, fragment):
    problem = check_overrides("pretrain", overrides)
    assert problem is not None and fragment in problem, problem


def test_check_overrides_accepts_what_hydra_accepts():
    """Everything the documented commands use passes: values, sweeps, groups, experiments, new keys
    (+), lists, null and hydra's own keys."""
    assert check_overrides("pretrain", []) is None
    assert check_overrides("pipeline", ["experiment=smoke", "pipeline.policy=uniform:4/4", "tracking.tags=[a,b]",
                                        "+tracking.run_name=x", "checkpoint=null", "hydra.run.dir=/tmp/x",
                                        "search.lr_logits=0.1,0.2", "model=resnet8,resnet20", "seed=range(0,3)",
                                        "data.loader=ffcv"]) is None
    assert check_overrides("search", ["search=seam", "search.sharpness.rho=0.05", "++train.epochs=2"]) is None
