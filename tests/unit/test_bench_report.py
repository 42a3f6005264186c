"""The benchmark report (benchmarks/report.py, benchmarks/common.py, scripts/gpu_check.sh): the table
from hand-made result files, the machine's description, result files written whole, peak memory of a
known allocation, and the GPU check's one-line refusal on a machine without CUDA."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

from benchmarks import common, report
from framework.paths import REPO_ROOT

MACHINE = {"cpu_model": "AMD EPYC", "cores": 2, "cpu_count": 2, "load_average": 0.1, "torch": "2.14.1",
           "python": "3.11.7", "platform": "Linux", "date": "2026-01-02T03:04:05Z", "cuda_device": None}


def _result(benchmark: str, figures: list[dict], **extra) -> dict:
    return {"schema": common.SCHEMA, "benchmark": benchmark, "status": "ok", "command": f"benchmarks/{benchmark}.py",
            "machine": MACHINE, "figures": figures, **extra}


def _row(text: str, script: str, first_cell: str) -> str:
    rows = [line for line in text.splitlines() if line.startswith(f"| {first_cell} |") and f"`{script}.py`" in line]
    assert len(rows) == 1, (first_cell, rows)
    return rows[0]


def test_report_shows_met_and_missed_targets_skipped_and_unrun_scripts():
    results = [
        _result("quant_overhead", [
            common.figure("full-precision step", 512.34, "ms"),
            common.figure("fixed mixed-policy QAT step / full-precision step", 1.05, "x", ("<=", 1.10)),
            common.figure("search supernet step / full-precision step", 1.38, "x", ("<=", 1.15)),
            common.figure("peak memory of one search supernet step", None, "MiB"),
        ]),
        {**_result("sweep_parallel", []), "status": "skipped", "reason": "needs 6 min"},
    ]
    text = report.render(results, ["quant_overhead", "sweep_parallel", "ddp_scaling", "search_decisiveness"])

    assert "| figure | measured | target | met | script |" in text
    assert _row(text, "quant_overhead", "fixed mixed-policy QAT step / full-precision step") == \
        "| fixed mixed-policy QAT step / full-precision step | 1.05x | <= 1.10x | yes | `quant_overhead.py` |"
    assert _row(text, "quant_overhead", "search supernet step / full-precision step").endswith(
        "| 1.38x | <= 1.15x | **no** | `quant_overhead.py` |")
    assert "| full-precision step | 512.3 ms | - | - | `quant_overhead.py` |" in text  # no target: no verdict
    assert "| peak memory of one search supernet step | not measured | - | - |" in text
    assert "skipped: needs 6 min" in _row(text, "sweep_parallel", "-")  # a reason, never a figure
    assert "no results yet" in _row(text, "ddp_scaling", "-")
    assert "not run by make bench (needs a study's outputs" in _row(text, "search_decisiveness", "-")
    assert "1 of 2 targets met; no figures from `sweep_parallel.py` (skipped)." in text
    assert "Machine: AMD EPYC, 2 cores, torch 2.14.1, Python 3.11.7, Linux." in text
    assert "    make bench" in text and "benchmarks/quant_overhead.py --json" in text  # how to rerun
    assert "No GPU results yet" in text


def test_report_has_a_section_named_after_the_gpu():
    gpu_machine = {**MACHINE, "cuda_device": "NVIDIA H200"}
    gpu = [{**_result("quant_overhead", [common.figure("search supernet step / full-precision step", 1.02, "x",
                                                          ("<=", 1.15))]), "machine": gpu_machine}]
    text = report.render([], [], gpu)
    section = text[text.index("## GPU: NVIDIA H200"):]
    assert "| search supernet step / full-precision step | 1.02x | <= 1.15x | yes | `quant_overhead.py` |" in section
    assert "GPU NVIDIA H200" in section


def test_figures_meet_their_targets_or_say_they_were_not_measured():
    assert common.figure("a", 1.2, "x", ("<=", 1.1))["met"] is False
    assert common.figure("a", 2.2, "x", (">=", 2.2))["met"] is True
    assert common.figure("a", True, "", ("==", True))["met"] is True
    assert common.figure("a", float("nan"), "x", ("<=", 1.1)) == {
        "name": "a", "value": None, "unit": "x", "target": {"op": "<=", "value": 1.1}, "met": None}
    assert common.figure("a", 3.0)["target"] is None
    with pytest.raises(ValueError, match="unknown target operator"):
        common.figure("a", 1.0, "x", ("<", 1.0))


def test_a_ratio_pairs_rounds_so_a_slow_spell_in_one_round_is_set_aside():
    """Each round's variant time over the reference time of the same round, median over rounds: the
    machine slowing both in round 2 leaves the ratio exact, and a spell that slows the variant alone
    in one of five rounds does not move it."""
    reference = [0.25, 0.40, 0.26, 0.27, 0.25]  # round 2 ran on a busy machine
    variant = [1.1 * t for t in reference]
    assert common.paired_ratio(variant, reference) == pytest.approx(1.1)
    spell = [*variant[:3], 2.0 * variant[3], variant[4]]
    assert common.paired_ratio(spell, reference) == pytest.approx(1.1)
    with pytest.raises(ValueError, match="one per round"):
        common.paired_ratio([0.3, 0.3], [0.25])


def test_machine_info_names_the_machine():
    info = common.machine_info()
    assert set(info) >= {"cpu_model", "cores", "torch", "date", "cuda_device"}
    assert info["cpu_model"] and info["cpu_model"] != "unknown"
    assert info["cores"] == len(os.sched_getaffinity(0))
    assert info["torch"] == torch.__version__
    assert len(info["date"]) == 20 and info["date"].endswith("Z")  # 2026-01-02T03:04:05Z, UTC
    assert info["cuda_device"] == (torch.cuda.get_device_name(0) if torch.cuda.is_available() else None)


def test_result_files_are_written_whole_and_read_back(tmp_path):
    path = tmp_path / "results" / "quant_overhead.json"
    common.write_json(path, _result("quant_overhead", [common.figure("x", 1.0, "x", ("<=", 1.1))]))
    assert [p.name for p in path.parent.iterdir()] == ["quant_overhead.json"]  # no temporary file left
    (path.parent / "broken.json").write_text("{not json")
    common.main(["mark", str(path.parent / "loaders.json"), "--status", "failed", "--reason", "exit code 2: no tree"])
    loaded = {r["benchmark"]: r for r in report.load_results(path.parent)}
    assert loaded["quant_overhead"]["figures"][0]["met"] is True
    assert loaded["broken"]["status"] == "failed" and "unreadable broken.json" in loaded["broken"]["reason"]
    assert loaded["loaders"]["status"] == "failed" and loaded["loaders"]["machine"]["cores"] >= 1
    assert "failed: exit code 2: no tree" in report.render(list(loaded.values()))


def test_junit_outcome_becomes_a_figure(tmp_path):
    xml = tmp_path / "t.xml"
    xml.write_text('<testsuites><testsuite name="pytest" tests="3">'
                   '<testcase classname="tests.gpu.test_gpu_paths" name="test_a"/>'
                   '<testcase classname="tests.gpu.test_gpu_paths" name="test_b"><failure message="x"/></testcase>'
                   '<testcase classname="tests.gpu.test_gpu_paths" name="test_c"><skipped message="y"/></testcase>'
                   '</testsuite></testsuites>')
    res = common.junit_result(xml, "gpu_tests", ["pytest -m gpu"])
    (fig,) = res["figures"]
    assert fig["value"] == 1 and fig["target"] == {"op": "==", "value": 3} and fig["met"] is False
    assert res["failed"] == ["tests.gpu.test_gpu_paths::test_b"]
    text = report.render([], [], [{**res, "machine": {**MACHINE, "cuda_device": "NVIDIA H200"}}])
    assert "| gpu_tests: tests that pass (of 3) | 1 | 3 | **no** | `tests/gpu` |" in text


MIB = 1024 * 1024


def _memory_or_skip(step, **kwargs) -> dict:
    try:
        return common.step_memory(step, **kwargs)
    except common.MemoryUnavailable as err:
        pytest.skip(f"peak RSS not measurable here: {err}")


def test_peak_memory_of_a_step_measures_a_known_allocation():
    def big():
        block = torch.ones(200 * MIB // 4)  # 200 MiB, written
        return float(block[-1])

    measured = _memory_or_skip(big)
    assert measured["measure"] == "cpu rss"
    assert 190 <= measured["step_mib"] <= 260, measured
    assert _memory_or_skip(lambda: None)["step_mib"] < 20

    calls = []

    def periodic():  # every third call allocates 100 MiB: the largest step is the one kept
        calls.append(1)
        if len(calls) % 3 == 0:
            return float(torch.ones(100 * MIB // 4)[-1])
        return 0.0

    assert 90 <= _memory_or_skip(periodic, warmup=1, steps=3)["step_mib"] <= 160


def test_memory_is_measured_in_a_fresh_process(tmp_path):
    script = tmp_path / "alloc.py"
    script.write_text(
        "import sys\n"
        f"sys.path.insert(0, {str(REPO_ROOT)!r})\n"
        "from benchmarks import common\n"
        "if sys.argv[2] == 'boom':\n"
        "    sys.exit('alloc.py: error: no such variant boom')\n"
        "def step():\n"
        "    block = b'x' * (150 * 1024 * 1024)\n"
        "    return block[-1]\n"
        "print('warming up')\n"
        "common.print_memory(sys.argv[2], common.step_memory(step))\n"
    )
    try:
        measured = common.memory_in_fresh_process(script, "big", [])
    except common.MemoryUnavailable as err:
        if "clear_refs" in str(err) or "status" in str(err):
            pytest.skip(f"peak RSS not measurable here: {err}")
        raise
    assert measured["variant"] == "big" and 140 <= measured["step_mib"] <= 200
    with pytest.raises(common.MemoryUnavailable, match="boom: alloc.py: error: no such variant boom"):
        common.memory_in_fresh_process(script, "boom", [])


def test_report_script_writes_benchmarks_md(tmp_path):
    results = tmp_path / "results"
    common.write_json(results / "loaders.json", _result("loaders", [common.figure("ratio", 2.3, "x", (">=", 2.2))]))
    out = tmp_path / "BENCHMARKS.md"
    assert report.main(["--results", str(results), "--out", str(out)]) == 0
    text = out.read_text()
    assert "| ratio | 2.30x | >= 2.20x | yes | `loaders.py` |" in text
    for name in report.benchmark_scripts():  # every script of benchmarks/ has a row
        assert f"`{name}.py` |" in text
    assert "common" not in report.benchmark_scripts() and "report" not in report.benchmark_scripts()


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA: the check would run")
def test_gpu_check_refuses_in_one_line_without_cuda():
    done = subprocess.run(["bash", str(REPO_ROOT / "scripts" / "gpu_check.sh")], capture_output=True, text=True,
                          timeout=120, env={**os.environ, "MPQ_PYTHON": sys.executable})
    lines = [line for line in done.stderr.splitlines() if line.strip()]
    assert done.returncode == 2, done.stderr
    assert len(lines) == 1 and lines[0].startswith("gpu_check: needs a CUDA device") and "sees none" in lines[0]
    assert done.stdout == ""


def test_bench_scripts_are_valid_bash():
    for name in ("bench.sh", "gpu_check.sh"):
        done = subprocess.run(["bash", "-n", str(REPO_ROOT / "scripts" / name)], capture_output=True, text=True)
        assert done.returncode == 0, done.stderr
