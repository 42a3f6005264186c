"""Bad sweep input is one MPQError naming the key and the fix, raised before any trial runs."""

import pytest

from framework.config import validate_config
from framework.errors import MPQError
from framework.tune.sweep import run_sweep
from tests.tune.conftest import sweep_config


@pytest.mark.parametrize("address, message", [
    ("127.0.0.1:9", r"tune.address=127.0.0.1:9: cannot reach a Ray cluster at 127.0.0.1:9 .*drop tune.address"),
    ("ray://127.0.0.1:9", r"tune.address=ray://127.0.0.1:9: (Ray Client is not installed|cannot reach a Ray cluster)"),
    ("somewhere", r"tune.address=somewhere is invalid: expected auto, host:port or ray://host:port"),
])
def test_an_unreachable_cluster_is_one_error_in_seconds(tmp_path, pretrained_checkpoint, address, message):
    import ray

    assert not ray.is_initialized()  # else the sweep would use the Ray already connected
    with pytest.raises(MPQError, match=message):
        run_sweep(sweep_config(tmp_path, pretrained_checkpoint, f"tune.address={address}"))


def test_auto_with_a_stale_ray_address_names_it(tmp_path, pretrained_checkpoint, monkeypatch):
    import ray

    assert not ray.is_initialized()
    monkeypatch.setenv("RAY_ADDRESS", "127.0.0.1:9")
    with pytest.raises(MPQError, match=r"tune.address=auto: cannot reach a Ray cluster at 127.0.0.1:9"):
        run_sweep(sweep_config(tmp_path, pretrained_checkpoint, "tune.address=auto"))


def test_resume_needs_a_sweep_to_restore(tmp_path, pretrained_checkpoint):
    with pytest.raises(MPQError, match=r"resume=true: there is no sweep of these 4 trials to restore in .*hydra.run.dir"):
        run_sweep(sweep_config(tmp_path, pretrained_checkpoint, "tune.resume=true"))


def test_a_sweep_needs_a_full_precision_checkpoint(tmp_path):
    with pytest.raises(MPQError, match="sweep needs init_checkpoint="):
        run_sweep(sweep_config(tmp_path, "null"))


@pytest.mark.parametrize("overrides, message", [
    (["tune.cpus_per_trial=0"], r"tune.cpus_per_trial=0 is invalid: expected a number > 0"),
    (["tune.max_concurrent=0"], r"tune.max_concurrent=0 is invalid"),
    (["tune.scheduler.name=hyperband"], r"tune.scheduler.name='hyperband' is invalid: choose one of asha, fifo"),
    (["tune.scheduler.grace_period=5", "search.epochs=2"], r"tune.scheduler.grace_period=5 is longer than a trial"),
    (["~tune.space", "+tune.space={search: {lr_logitz: {grid: [0.1]}}}"], r"tune.space.search.lr_logitz: the config has no key"),
])
def test_bad_tune_values_name_the_key(tmp_path, pretrained_checkpoint, overrides, message):
    cfg = sweep_config(tmp_path, pretrained_checkpoint, *overrides)
    with pytest.raises(MPQError, match=message):
        validate_config(cfg)  # what `mpq sweep` does first (types and ranges: framework.config)
        run_sweep(cfg)
