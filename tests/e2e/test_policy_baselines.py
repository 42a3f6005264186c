"""`policy=hawq` and `policy=sensitivity` on the command line: `mpq evaluate` derives the policy from
the session's pretrained checkpoint, quantizes it after training and scores it, writing a
budget-meeting policy.json; `mpq cost`, which has no checkpoint, refuses them in one line. The
command is called in-process (launchers.cli.main): `mpq evaluate` and `mpq cost` have their
subprocess smoke runs in test_cli.py and test_quant_cli.py."""

import pytest

from tests.conftest import assert_one_error_line, read_json, run_mpq_in_process, run_stage_in_process

#: a few measurements and test images: the command's path, not the estimate's precision
SMALL = ("tracking.enabled=false", "data.test_fraction=0.1", "sensitivity.batches=1", "sensitivity.batch_size=32",
         "sensitivity.probes=2")


@pytest.mark.parametrize("spec", ["hawq", "sensitivity"])
def test_evaluate_quantizes_a_pretrained_checkpoint_under_the_derived_policy(spec, pretrained_checkpoint, tmp_path):
    result = run_stage_in_process("evaluate", tmp_path, f"checkpoint={pretrained_checkpoint}", f"policy={spec}", *SMALL)
    policy = read_json(tmp_path / "policy.json")
    layers, budget = policy["layers"], policy["budget"]
    bitops = sum(layer["macs"] * layer["w_bits"] * layer["a_bits"] for layer in layers.values())
    assert budget["bitops"] and bitops <= budget["bitops"] and policy["cost"]["target"]["bitops"] == pytest.approx(bitops)
    assert result["metrics"]["bitops"] == pytest.approx(bitops)  # the model evaluated is the one the policy describes
    assert {name for name, layer in layers.items() if layer["fixed"]} == {"conv1", "fc"}
    assert all((layer["w_bits"], layer["a_bits"]) == (8, 8) for layer in layers.values() if layer["fixed"])
    provenance = policy["provenance"]
    assert provenance["method"] == spec and provenance["batches"] == 1 and provenance["samples"] == 32
    assert set(provenance["layers"]) == {name for name, layer in layers.items() if not layer["fixed"]}
    assert result["quantized"] is True and 0.0 <= result["metrics"]["top1"] <= 1.0


def test_cost_has_no_checkpoint_to_derive_hawq_from(tmp_path):
    proc = run_mpq_in_process("cost", "policy=hawq", "tracking.enabled=false", f"hydra.run.dir={tmp_path}")
    assert_one_error_line(proc, "cost", "policy=hawq", "full-precision checkpoint", "mpq evaluate checkpoint=")
