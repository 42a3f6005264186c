"""`mpq study`: every row and seed as the existing stages, a report whose numbers are the runs'
numbers, and a resume that recomputes nothing that finished (the smoke study, interrupted and
resumed) and the ImageNet study's runs on a tiny tree: slow. The fast tier keeps a study of one row
and one seed (the study stage's smoke run), the comparison and the seeded policies (pure functions)
and the error lines (the command in-process)."""

from __future__ import annotations

import signal
from statistics import mean, stdev

import pytest

from framework.errors import MPQError
from framework.study.plan import compose_stage, plan_study, seeded_policy
from framework.study.report import compare
from tests.conftest import (
    assert_one_error_line,
    compose_config,
    make_image_tree,
    read_json,
    read_result,
    run_mpq,
    run_mpq_in_process,
    run_stage,
    start_mpq,
    wait_for,
)

ROWS = ("uniform-budget", "random", "asga-mnist")
SEEDS = (0, 1)


@pytest.fixture(scope="module")
def smoke_study(tmp_path_factory, pretrained_checkpoint):
    """`mpq study study=smoke`, interrupted after its first finished run, then run again to the end."""
    base = tmp_path_factory.mktemp("study")
    folder = base / "study"
    args = ("study=smoke", f"study.init_checkpoint={pretrained_checkpoint}", f"tracking.repo={base / 'aim'}",
            f"hydra.run.dir={folder}")
    proc = start_mpq("study", *args)
    wait_for(lambda: any(folder.glob("runs/*/*/run.json")), proc, timeout=900, what="the study's first run")
    proc.send_signal(signal.SIGTERM)
    proc.wait(timeout=120)
    finished = {path: path.stat().st_mtime_ns for path in folder.glob("runs/*/*/run.json")}
    resumed = run_mpq("study", *args, timeout=1800)
    return {"folder": folder, "args": args, "interrupted": proc, "finished": finished, "resumed": resumed}


# The tests of the smoke study (six runs, stopped after the first, resumed): slow, `make test-all`.
@pytest.mark.slow
@pytest.mark.study
@pytest.mark.faults
def test_interrupted_study_resumes_without_recomputing_finished_runs(smoke_study):
    assert smoke_study["interrupted"].returncode != 0  # it was stopped, not finished
    finished, resumed = smoke_study["finished"], smoke_study["resumed"]
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert 0 < len(finished) < len(ROWS) * len(SEEDS)
    assert f"{len(finished)} finished before" in resumed.stdout
    for path, mtime in finished.items():
        assert path.stat().st_mtime_ns == mtime, f"{path} was recomputed"
    assert f"{len(ROWS) * len(SEEDS)}/{len(ROWS) * len(SEEDS)} runs done" in resumed.stdout


@pytest.mark.slow
@pytest.mark.study
def test_rerunning_a_finished_study_recomputes_nothing_and_gives_the_same_study_json(smoke_study):
    folder = smoke_study["folder"]
    before = (folder / "study.json").read_bytes()
    runs = {path: path.stat().st_mtime_ns for path in folder.glob("runs/*/*/*/result.json")}
    again = run_mpq("study", *smoke_study["args"])
    assert again.returncode == 0, again.stderr[-3000:]
    assert f"{len(ROWS) * len(SEEDS)} finished before" in again.stdout
    assert {path: path.stat().st_mtime_ns for path in folder.glob("runs/*/*/*/result.json")} == runs
    assert (folder / "study.json").read_bytes() == before


@pytest.mark.slow
@pytest.mark.study
def test_study_json_holds_every_run_and_its_numbers_are_the_runs_numbers(smoke_study):
    folder = smoke_study["folder"]
    report = read_json(folder / "study.json")
    assert [row["name"] for row in report["rows"]] == list(ROWS)
    for row in report["rows"]:
        assert row["seeds"] == list(SEEDS)
        top1 = [read_result(folder / run / "evaluate")["metrics"]["top1"] for run in row["runs"]]
        assert row["top1_mean"] == pytest.approx(mean(top1))
        assert row["top1_std"] == pytest.approx(stdev(top1))
        landscape = [read_result(folder / run / "landscape")["metrics"]["hessian_top_eigenvalue"] for run in row["runs"]]
        assert row["hessian_top_eigenvalue_mean"] == pytest.approx(mean(landscape))
    searched = next(row for row in report["rows"] if row["name"] == "asga-mnist")
    assert searched["search_images_mean"] > 0 and searched["search_compute_rel"] == pytest.approx(1.0)
    assert (folder / "study.md").is_file()
    for figure in report["figures"].values():
        assert (folder / figure).stat().st_size > 0
    markdown = (folder / "study.md").read_text()
    for row in report["rows"]:
        assert f"| {row['label']} |" in markdown
        assert f"{100 * row['top1_mean']:.2f} ± {100 * row['top1_std']:.2f}" in markdown


@pytest.mark.slow
@pytest.mark.study
def test_every_policy_of_the_study_meets_its_budget_and_random_differs_by_seed(smoke_study):
    report = read_json(smoke_study["folder"] / "study.json")
    for run in report["runs"]:
        assert run["bitops"] <= run["policy_budget"]["bitops"] * (1 + 1e-9), run["dir"]
    randoms = [run["policy"] for run in report["runs"] if run["row"] == "random"]
    assert len(randoms) == 2 and randoms[0] != randoms[1]


@pytest.mark.slow
@pytest.mark.study
def test_asga_rows_record_the_radius_they_searched_with(smoke_study):
    report = read_json(smoke_study["folder"] / "study.json")
    for run in report["runs"]:
        if run["row"] == "asga-mnist":
            trace = run["search"]["rho_trace"]
            assert 0 < len(trace) <= run["search"]["steps"]  # every two-pass step (after a resume: from there on)
            assert all(0.01 - 1e-12 <= rho <= 0.3 + 1e-12 for _, rho in trace)  # ASGA's radius range (conf/search/dnas.yaml)
    assert "radius" in report["figures"]


def test_rows_are_compared_seed_by_seed():
    """A consistent gain on every shared seed is a difference even when it is smaller than the seed
    spread of either row (the paired design removes what the seed does to both); an inconsistent one is not."""
    a = {"name": "a", "top1_by_seed": {"0": 0.80, "1": 0.83, "2": 0.86, "3": 0.90}}
    consistent = compare(a, {"name": "b", "top1_by_seed": {"0": 0.795, "1": 0.824, "2": 0.856}})
    assert consistent["verdict"] == "better" and consistent["n"] == 3 and consistent["seeds"] == [0, 1, 2]
    assert consistent["low"] > 0 and consistent["delta"] == pytest.approx((0.005 + 0.006 + 0.004) / 3)
    mixed = compare(a, {"name": "b", "top1_by_seed": {"0": 0.79, "1": 0.84, "2": 0.85}})
    assert mixed["verdict"] == "no difference" and mixed["low"] < 0 < mixed["high"]
    assert compare(a, {"name": "b", "top1_by_seed": {"0": 0.85, "1": 0.88, "2": 0.90}})["verdict"] == "worse"
    assert compare(a, {"name": "b", "top1_by_seed": {"7": 0.8}})["verdict"] == "not measured"


def test_random_rows_draw_a_new_policy_per_seed_and_other_specs_stay_fixed():
    assert [seeded_policy("random", s) for s in (0, 1)] == ["random:0", "random:1"]
    assert [seeded_policy("random+100", s) for s in (0, 2)] == ["random:100", "random:102"]  # a second random row
    assert seeded_policy("random-best:8", 3) == "random-best:8" and seeded_policy("uniform:3/3", 1) == "uniform:3/3"
    with pytest.raises(MPQError, match="random\\+<n>"):
        seeded_policy("random+x", 0)


@pytest.mark.parametrize("override,fragments", [
    ("study.rows.0.policy=uniform:9/9", ("row uniform-budget", "policy=uniform:9/9", "9 bits is not supported")),
    ("search.budget_bitops=1000", ("row uniform-budget", "no uniform W/A")),
])
def test_a_bad_row_is_one_error_line_before_the_pretraining(tmp_path, override, fragments):
    """The study checks every row's stages, policy and budget on the untrained model first."""
    proc = run_mpq("study", "study=smoke", override, f"hydra.run.dir={tmp_path}", timeout=120)
    assert_one_error_line(proc, "study", "study smoke", *fragments)
    assert not (tmp_path / "pretrain").exists()


@pytest.mark.smoke
def test_a_study_of_one_row_and_one_seed_writes_its_report(tmp_path, pretrained_checkpoint):
    """`mpq study study=smoke` cut to its uniform-budget row at seed 0 from the session's checkpoint,
    without the landscape: plan, check, fine-tune, evaluate, then study.json and study.md."""
    folder = tmp_path / "study"
    result = run_stage("study", folder, "study=smoke", "study.seeds=[0]",
                       "study.rows=[{name: uniform-budget, policy: uniform-budget}]", "study.baselines=[uniform-budget]",
                       "study.reference=uniform-budget", "study.landscape=false",
                       f"study.init_checkpoint={pretrained_checkpoint}", "tracking.enabled=false")
    assert result["metrics"]["runs"] == 1 and result["metrics"]["rows"] == 1
    report = read_json(folder / "study.json")
    (row,) = report["rows"]
    assert (row["name"], row["n"], row["seeds"]) == ("uniform-budget", 1, [0])
    (run,) = report["runs"]
    assert run["top1"] == read_result(folder / row["runs"][0] / "evaluate")["metrics"]["top1"] == row["top1_mean"]
    assert run["bitops"] <= run["policy_budget"]["bitops"] * (1 + 1e-9)
    assert f"| {row['label']} |" in (folder / "study.md").read_text()


def test_study_without_a_study_or_with_a_bad_row_is_one_error_line(tmp_path):
    proc = run_mpq_in_process("study", f"hydra.run.dir={tmp_path / 'none'}")
    assert_one_error_line(proc, "study", "study=<name>")
    proc = run_mpq_in_process("study", "study=smoke", "+study.rows.0.search=dnas", f"hydra.run.dir={tmp_path / 'bad'}")
    assert_one_error_line(proc, "study", "uniform-budget", "exactly one of")


@pytest.mark.slow  # 96 stage configs composed, then a ResNet-18 pretraining and a searched run in new processes
@pytest.mark.study
def test_the_imagenet_study_composes_and_its_runs_take_a_few_steps_on_an_imagenet_shaped_tree(tmp_path):
    """study=imagenet_resnet18 is meant for GPUs; here every run of it composes and validates, and the
    pretraining and one searched run take two steps each on a tiny ImageFolder tree of JPEGs."""
    tree = make_image_tree(tmp_path / "tree", classes=4, per_class=8, size=(48, 40), suffix=".jpg")
    tiny = [f"data.root={tree}", f"proxy.root={tree}", "data.input_size=32", "proxy.fraction=0.5", "data.num_workers=0",
            "train.max_steps=2", "train.batch_size=8", "train.eval_batch_size=16", "search.max_steps=2",
            "search.batch_size=8", "finetune.max_steps=2", "finetune.batch_size=8", "landscape.batches=1",
            "landscape.batch_size=8", "landscape.max_iters=2", "landscape.points=3", f"tracking.repo={tmp_path / 'aim'}"]
    folder = tmp_path / "study"
    plan = plan_study(compose_config("study", ["study=imagenet_resnet18", *tiny]), folder)
    assert len(plan.runs) == 8 * 3
    for run in plan.runs:
        stages = ("search", "finetune", "evaluate", "landscape") if run.searches else ("finetune", "evaluate", "landscape")
        for stage in stages:
            cfg = compose_stage(stage, run.overrides, run.dir)
            assert (cfg.model.name, cfg.data.name, cfg.seed) == ("resnet18", "imagefolder", run.seed)
            if run.searches:
                assert cfg.proxy.name == "imagefolder" and cfg.search.budget_uniform_bits == 4
    args = ["study=imagenet_resnet18", *tiny, f"study.dir={folder}"]
    run_stage("study", folder / "slurm" / "pretrain", *args, "study.only=pretrain")
    run_stage("study", folder / "slurm" / "asga-in4" / "seed0", *args, "study.only=asga-in4/0")
    record = read_json(folder / "runs" / "asga-in4" / "seed0" / "run.json")
    assert record["search"]["steps"] == 2 and 0.0 <= record["top1"] <= 1.0
    assert record["bitops"] <= record["policy_budget"]["bitops"] * (1 + 1e-9)
    assert "layer4.1.conv2" in record["policy"]  # a ResNet-18 policy
