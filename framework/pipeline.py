"""`mpq pipeline`: the stages chained in sub-folders of one run directory, and its summary table.

The stages themselves live in :mod:`framework.stages` (and the search and sweep in their
packages); this module only composes them, passing files (checkpoints, policies) from one to
the next, never live objects.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from omegaconf import DictConfig

from framework.results import Result, write_result
from framework.search.loop import check_search_budget, run_search
from framework.stage import run_directory, sub_config
from framework.stage.checks import check_policy_spec, uniform_frontier_specs
from framework.stages.evaluate import run_evaluate
from framework.stages.export import run_export
from framework.stages.finetune import run_finetune
from framework.stages.pretrain import run_pretrain
from framework.stats import paired_difference
from framework.tune.sweep import run_sweep

#: what the pipeline's result.json keeps of the export's metrics
EXPORT_SUMMARY = ("packed_top1", "onnx_top1", "onnx_default_top1", "agreement", "images", "packed_weight_bytes",
                  "policy_weight_bits", "safetensors_bytes", "onnx_bytes", "float32_bytes")



#: RunStage(stage name, the stage's config) -> its Result: where the pipeline's stages run when not
#: in this process (`launcher=ray` sends them to Ray Train workers, launchers/ray_train.py)
RunStage = Callable[[str, DictConfig], Result]


def run_pipeline(cfg: DictConfig, run_stage: RunStage | None = None) -> Result:
    """The default run, each stage in its own sub-folder, then one summary table.

    pretrain (full precision, target data) -> search (policy on the proxy data, from the pretrained
    checkpoint) -> finetune (the target model under the searched policy) -> evaluate (the quantized
    checkpoint). `pipeline.policy=uniform:W/A` (or `random:<seed>`, `uniform-budget`, a policy file)
    skips the search and fine-tunes that policy instead, for baselines. `pipeline.sweep=true` runs a
    Ray Tune sweep (`tune.*`, framework.tune) in place of the single search and fine-tunes and
    evaluates the `tune.top_k` best policies under the budget (by proxy top-1): the first in
    `finetune/` and `evaluate/`, the others in `finetune_top<i>/` and `evaluate_top<i>/`. The
    summary's headline is the sweep's selected policy (the best on the proxy); the others are listed
    beside it, since picking among them by their test top-1 would select on the test split.
    With `pipeline.export` (the default) the fine-tuned model is exported (`mpq export`, in
    `export/`) and the summary shows its packed size and parity. With `pipeline.baseline` (the
    default) the best uniform split within the search's budget is fine-tuned and evaluated the same
    way (:func:`best_uniform_split`: every split of the budget's uniform frontier fine-tuned, the one
    of the highest validation top-1 kept), and the summary shows it beside the searched policy. With `run_stage` (`launcher=ray`), every stage
    but the sweep runs through it (the sweep's Ray Tune joins the Ray this process is connected to).
    """
    stage = "pipeline"
    run_dir = run_directory(cfg, stage)
    rows: list[dict[str, Any]] = []
    artifacts: dict[str, str] = {}

    elsewhere = {run_pretrain: "pretrain", run_search: "search", run_finetune: "finetune", run_evaluate: "evaluate",
                 run_export: "export"}

    def timed(name: str, fn, sub_cfg) -> Result:
        started = time.time()
        result = run_stage(elsewhere[fn], sub_cfg) if run_stage is not None and fn in elsewhere else fn(sub_cfg)
        rows.append({"stage": name, "seconds": time.time() - started, "metrics": result.metrics})
        return result

    if not cfg.pipeline.policy and not cfg.pipeline.sweep:
        check_search_budget(cfg)  # an impossible budget is an error now, not after pretraining
    if cfg.pipeline.policy:
        check_fixed_policy(cfg)  # likewise a malformed or impossible policy
    pre = timed("pretrain", run_pretrain, sub_config(cfg, run_dir / "pretrain"))
    fp_checkpoint = pre.artifacts["checkpoint"]
    fixed_policy = cfg.pipeline.policy
    policy_stage = None
    candidates: list[dict[str, Any]] = []  # the policies to fine-tune, best first
    if fixed_policy:
        candidates.append({"policy": str(fixed_policy)})
    elif cfg.pipeline.sweep:
        policy_stage = "sweep"
        swept = timed("sweep", run_sweep, sub_config(cfg, run_dir / "sweep", init_checkpoint=fp_checkpoint))
        artifacts.update(policy=swept.artifacts["policy"], pareto_plot=swept.artifacts["pareto_plot"])
        for rank, top in enumerate(swept.extra["selection"]["top"]):
            # the best is the sweep's policy.json, which adds the sweep's provenance to the trial's
            policy = swept.artifacts["policy"] if rank == 0 else top["policy"]
            candidates.append({"trial": top["key"], "policy": policy, "proxy_top1": top["proxy_top1"],
                               "proxy_bitops": top["bitops"]})
    else:
        policy_stage = "search"
        found = timed("search", run_search, sub_config(cfg, run_dir / "search", init_checkpoint=fp_checkpoint))
        artifacts["policy"] = found.artifacts["policy"]
        candidates.append({"policy": found.artifacts["policy"]})
    for rank, candidate in enumerate(candidates):
        suffix = "" if rank == 0 else f"_top{rank + 1}"
        fine = timed(f"finetune{suffix}", run_finetune, sub_config(
            cfg, run_dir / f"finetune{suffix}", init_checkpoint=fp_checkpoint, policy=candidate["policy"]))
        evaluated = timed(f"evaluate{suffix}", run_evaluate,
                          sub_config(cfg, run_dir / f"evaluate{suffix}", checkpoint=fine.artifacts["checkpoint"]))
        candidate.update(checkpoint=fine.artifacts["checkpoint"], top1=evaluated.metrics["top1"],
                         gbitops=evaluated.metrics["gbitops"])
        if rank == 0:
            ev = evaluated
            artifacts.update(fp_checkpoint=fp_checkpoint, checkpoint=fine.artifacts["checkpoint"])

    exported = None
    if cfg.pipeline.export:
        # the fine-tuned model as integer artifacts (model.safetensors, model.onnx), with its parity check
        exported = timed("export", run_export, sub_config(cfg, run_dir / "export", checkpoint=artifacts["checkpoint"]))
        artifacts.update(safetensors=exported.artifacts["safetensors"], onnx=exported.artifacts["onnx"])

    baseline = None
    if cfg.pipeline.baseline and policy_stage is not None:
        baseline = best_uniform_split(cfg, run_dir, fp_checkpoint, timed)
        artifacts["baseline_checkpoint"] = baseline["checkpoint"]

    # pipeline.seeds > 1: the same fine-tunes again at seeds seed+1, seed+2, ... (the searched policy and
    # the baseline share each seed, hence its data order): the spread the summary's difference is read against
    seeds = [int(cfg.seed) + i for i in range(int(cfg.pipeline.seeds))]
    top1_by_seed = {"searched": [ev.metrics["top1"]], "baseline": [baseline["top1"]] if baseline else []}
    for seed in seeds[1:]:
        runs = [("searched", f"finetune_seed{seed}", candidates[0]["policy"])]
        if baseline is not None:
            runs.append(("baseline", f"finetune_baseline_seed{seed}", baseline["policy"]))
        for label, folder, policy in runs:
            fine = timed(folder, run_finetune, sub_config(cfg, run_dir / folder, init_checkpoint=fp_checkpoint,
                                                          policy=policy, seed=seed))
            top1_by_seed[label].append(fine.metrics["top1"])

    metrics = {
        "fp_top1": pre.metrics["top1"],
        "top1": ev.metrics["top1"],
        "gbitops": ev.metrics["gbitops"],
        "size_mb": ev.metrics["size_mb"],
        "avg_w_bits": ev.metrics.get("avg_w_bits"),
        "avg_a_bits": ev.metrics.get("avg_a_bits"),
        "seeds": seeds,
        "top1_seeds": top1_by_seed["searched"],
        "top1_mean": sum(top1_by_seed["searched"]) / len(seeds),
        "seconds": round(sum(r["seconds"] for r in rows), 2),
        "stage_seconds": {r["stage"]: round(r["seconds"], 2) for r in rows},
    }
    extra: dict[str, Any] = {"stages": [{"stage": r["stage"], "seconds": r["seconds"]} for r in rows], "run_dir": str(run_dir)}
    if policy_stage is not None:
        metrics["proxy_top1"] = rows[1]["metrics"].get("proxy_top1")
    if baseline is not None:
        metrics.update(baseline_top1=baseline["top1"], baseline_gbitops=baseline["gbitops"],
                       baseline_size_mb=baseline["size_mb"], top1_minus_baseline=ev.metrics["top1"] - baseline["top1"],
                       baseline_top1_seeds=top1_by_seed["baseline"],
                       baseline_top1_mean=sum(top1_by_seed["baseline"]) / len(seeds),
                       paired=paired_difference(top1_by_seed["searched"], top1_by_seed["baseline"]))
        extra["baseline"] = baseline
    if policy_stage == "sweep":
        metrics["selected_trial"] = rows[1]["metrics"]["selected_trial"]
        extra["finetuned"] = candidates
    if exported is not None:
        metrics["export"] = {k: exported.metrics[k] for k in EXPORT_SUMMARY}
    result = Result(stage, metrics=metrics, artifacts=artifacts, extra=extra)
    write_result(run_dir, result, cfg)
    print(format_summary(cfg, metrics, rows, run_dir, policy_stage, candidates, baseline))
    return result


def best_uniform_split(cfg: DictConfig, run_dir: Path, fp_checkpoint: str, timed) -> dict[str, Any]:
    """The baseline a searched policy is compared with: every split of the budget's uniform frontier
    (framework.stage.checks.uniform_frontier_specs: 3/2 and 2/3 at 2.5 bits) fine-tuned at the first
    seed in `finetune_baseline_<W>-<A>/`, the one of the highest validation top-1 (held-out training
    images; the test split is never a selection) evaluated in `evaluate_baseline/`. Without a
    validation split (`data.val_fraction=0`) the first split (the most weight bits) is kept."""
    specs = uniform_frontier_specs(cfg)
    tried = []
    for spec in specs:
        w, a = spec.split(":", 1)[1].split("/")
        fine = timed(f"finetune_baseline_{w}-{a}", run_finetune, sub_config(
            cfg, run_dir / f"finetune_baseline_{w}-{a}", init_checkpoint=fp_checkpoint, policy=spec))
        tried.append({"policy": spec, "checkpoint": fine.artifacts["checkpoint"],
                      "val_top1": (fine.extra.get("history") or [{}])[-1].get("val_top1")})
    scored = [t for t in tried if t["val_top1"] is not None]
    chosen = max(scored, key=lambda t: t["val_top1"]) if scored else tried[0]
    evaluated = timed("evaluate_baseline", run_evaluate,
                      sub_config(cfg, run_dir / "evaluate_baseline", checkpoint=chosen["checkpoint"]))
    return {"policy": chosen["policy"], "checkpoint": chosen["checkpoint"], "splits": tried,
            "selected_by": "validation top-1" if scored else "no validation split: the first split",
            **{k: evaluated.metrics.get(k) for k in ("top1", "gbitops", "size_mb", "avg_w_bits", "avg_a_bits")}}


def check_fixed_policy(cfg: DictConfig) -> None:
    """`pipeline.policy` resolved on the untrained `cfg.model` before the pretraining
    (framework.stage.checks): a bad policy is one error line in seconds."""
    check_policy_spec(cfg, str(cfg.pipeline.policy), "pipeline.policy")


def _stage_note(stage: str, m: dict[str, Any]) -> str:
    if stage == "search":
        # repair_applied: the policy fitted to the budget differs from the argmax of the logits
        repaired = " (repaired to budget)" if m.get("repair_applied") else ""
        decided = ""
        if m.get("entropy") is not None:
            decided = (f", entropy {m['entropy']:.2f}" + (" (undecided: the budget fit chose the policy)"
                                                          if m.get("undecided") else ""))
        return f"proxy top-1 {100 * m['proxy_top1']:.2f} %, {m['gbitops']:.4f} GBitOps{repaired}{decided}"
    if stage == "sweep":
        return (f"{m['finished']} of {m['trials']} trials finished ({m['stopped']} stopped early); selected trial "
                f"{m['selected_trial']}: proxy top-1 {100 * m['proxy_top1']:.2f} %, {m['gbitops']:.4f} GBitOps")
    if stage == "export":
        return (f"packed {100 * m['packed_top1']:.2f} %, onnxruntime {100 * m['onnx_top1']:.2f} %, "
                f"{100 * m['agreement']:.2f} % same predictions ({m['images']} images)")
    if stage.startswith("evaluate"):
        return f"top-1 {100 * m['top1']:.2f} % on {m['samples']} test images"
    return f"top-1 {100 * m['top1']:.2f} % ({m['steps']} steps)"


def _pct_or_dash(value: float | None) -> str:
    return "–" if value is None else f"{100 * value:.2f} %"


def paired_verdict(paired: dict[str, Any], seeds: list[int]) -> str:
    """The summary's reading of the paired difference searched - baseline (framework.stats)."""
    if paired["n"] == 1:
        return (f"{100 * paired['mean']:+.2f} points at one seed: no verdict (pipeline.seeds=3 fine-tunes both at 3 "
                f"paired seeds and gives the difference's 95 % interval)")
    values = ", ".join(f"{100 * v:+.2f}" for v in paired["values"])
    return (f"{100 * paired['mean']:+.2f} points, mean of {paired['n']} paired seeds ({values}); "
            f"{round(100 * paired['confidence'])} % interval [{100 * paired['low']:+.2f}, {100 * paired['high']:+.2f}]: "
            f"{paired['verdict']}")


def format_summary(cfg: DictConfig, metrics: dict[str, Any], rows: list[dict[str, Any]], run_dir: Path,
                   policy_stage: str | None = "search", candidates: list[dict[str, Any]] | None = None,
                   baseline: dict[str, Any] | None = None) -> str:
    """The table `mpq pipeline` prints at the end."""
    method = {None: "fixed policy", "search": str(cfg.search.method)}.get(policy_stage, "Ray Tune sweep")
    lines = [
        "",
        f"mpq pipeline summary: {cfg.model.name} on {cfg.data.name}, policy searched on {cfg.proxy.name} ({method})",
        f"  full-precision top-1   {100 * metrics['fp_top1']:6.2f} %",
        f"  policy                 W {metrics['avg_w_bits']:.2f} / A {metrics['avg_a_bits']:.2f} bits on average "
        f"(searched layers, MAC-weighted), {metrics['gbitops']:.4f} GBitOps, {metrics['size_mb']:.4f} MB",
        f"  quantized top-1        {100 * metrics['top1']:6.2f} %",
    ]
    seeds = metrics.get("seeds") or [cfg.seed]
    if len(seeds) > 1:
        lines[-1] += (f"   (seed {seeds[0]}; over seeds {', '.join(map(str, seeds))}: mean "
                      f"{100 * metrics['top1_mean']:.2f} %, range {100 * min(metrics['top1_seeds']):.2f}-"
                      f"{100 * max(metrics['top1_seeds']):.2f} %)")
    if baseline is not None:
        several = len(seeds) > 1
        searched_top1 = metrics["top1_mean"] if several else metrics["top1"]
        baseline_top1 = metrics["baseline_top1_mean"] if several else baseline["top1"]
        lines += [
            "",
            f"  {'policy':<28}{'W/A bits':>12}{'GBitOps':>10}{'size MB':>9}{'top-1':>10}"
            + (f"   (mean of {len(seeds)} seeds)" if several else ""),
            f"  {'searched (' + method + ')':<28}{metrics['avg_w_bits']:>6.2f}/{metrics['avg_a_bits']:<5.2f}"
            f"{metrics['gbitops']:>10.4f}{metrics['size_mb']:>9.4f}{100 * searched_top1:>8.2f} %",
            f"  {'uniform ' + baseline['policy'].split(':', 1)[1] + ' (baseline)':<28}"
            f"{baseline['avg_w_bits']:>6.2f}/{baseline['avg_a_bits']:<5.2f}"
            f"{baseline['gbitops']:>10.4f}{baseline['size_mb']:>9.4f}{100 * baseline_top1:>8.2f} %",
            "  baseline: the uniform split of the highest validation top-1 of those that fill the budget ("
            + ", ".join(f"{t['policy'].split(':', 1)[1]} {_pct_or_dash(t['val_top1'])}" for t in baseline["splits"])
            + f"; {baseline['selected_by']})",
            f"  searched minus baseline: {paired_verdict(metrics['paired'], seeds)}",
        ]
    exported = metrics.get("export")
    if exported:
        kib = 1024
        lines += [
            f"  exported               weights {exported['packed_weight_bytes'] / kib:.1f} KiB packed (policy "
            f"{exported['policy_weight_bits'] / 8 / kib:.1f} KiB), model.safetensors "
            f"{exported['safetensors_bytes'] / kib:.1f} KiB, model.onnx {exported['onnx_bytes'] / kib:.1f} KiB; "
            f"float32 {exported['float32_bytes'] / kib:.1f} KiB",
            f"  export parity          packed {100 * exported['packed_top1']:.2f} %, onnxruntime {100 * exported['onnx_top1']:.2f} % "
            f"(default optimisations {100 * exported['onnx_default_top1']:.2f} %), same prediction as the framework on "
            f"{100 * exported['agreement']:.2f} % of {exported['images']} images",
        ]
    lines += [
        "",
        f"  {'stage':<24}{'time (s)':>10}   result",
    ]
    for row in rows:
        note = _stage_note(row["stage"], row["metrics"])
        lines.append(f"  {row['stage']:<24}{row['seconds']:>10.1f}   {note}")
    lines.append(f"  {'total':<24}{sum(r['seconds'] for r in rows):>10.1f}")
    if policy_stage == "sweep" and len(candidates or []) > 1:
        lines += ["", f"  {'policy':<8}{'trial':<14}{'proxy top-1':>12}{'GBitOps':>10}{'top-1':>10}   (best on the proxy first)"]
        for rank, c in enumerate(candidates or []):
            lines.append(f"  #{rank + 1:<7}{c['trial']:<14}{100 * c['proxy_top1']:>10.2f} %{c['gbitops']:>10.4f}"
                         f"{100 * c['top1']:>8.2f} %")
    where = {"search": "search/policy.json, ", "sweep": "sweep/policy.json, sweep/pareto.png, "}.get(policy_stage, "")
    exports = ", export/model.safetensors, export/model.onnx" if exported else ""
    lines.append(f"outputs: {run_dir}  (result.json; pretrain/, {where}finetune/checkpoints/{exports})")
    return "\n".join(lines)


