"""The proxy search (`mpq search`): a supernet of the target model trained on the proxy data.

1. Start from the full-precision checkpoint of the target model (`init_checkpoint`). Its classifier
   head is kept when the proxy shares the target's labels (the same dataset and class count: a subset
   of the target) and `search.head=auto`; otherwise a fresh head for the proxy's classes.
2. Convert it to a supernet (`search.quant`: min-max weights, learned-range activations, candidate
   bits per layer; first conv and last linear fixed). Each layer's MACs are measured at the
   *target* resolution, so the complexity term and the budget speak of the BitOps that will be
   deployed; the policy also records its cost at the proxy resolution.
3. Train weights and logits together on the same proxy batches (single-level, as EdMIPS/GMPQ):
   the task loss (CE, plus SEAM's margin term for `seam`) through the two-pass optimizer of the
   method's sharpness rule (none for `dnas`/`seam`, ASGA for `asga`/`seam_asga`), the complexity
   penalty's gradient added to the logits outside the two passes.
4. Derive the policy by argmax of the logits; with a budget (`search.budget_bitops` or
   `budget_uniform_bits`, and/or `budget_size_mb`) and `search.repair`, fit it to the budget exactly:
   the most probable policy under the bit probabilities that meets the budget and uses at least
   `search.budget_fill` of it when some policy can (a multiple-choice knapsack solved by HiGHS,
   framework.policy.knapsack); write `policy.json` with its provenance and plots.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import Any

from omegaconf import DictConfig, OmegaConf, open_dict
from torch import nn

from framework import __version__
from framework.data import build_dataset, build_loader, get_dataset_spec, validation_split
from framework.errors import MPQError
from framework.policy import (
    BudgetLimits,
    budget_from_config,
    check_budget_reachable,
    cost_at,
    derive_bits,
    fit_to_budget,
    make_policy,
    write_policy,
)
from framework.quant import (
    SearchConv2d,
    SearchLinear,
    build_supernet,
    expected_bitops,
    fixed_bits_of,
    fixed_layer_names,
    float_parameter_count,
    trace_layers,
)
from framework.results import Result, write_result
from framework.search.decisiveness import decisiveness
from framework.search.step import SearchStep
from framework.stage import build_model, load_full_precision_checkpoint, model_meta, start_stage
from framework.track import open_tracker
from framework.track.figures import plot_bit_probabilities
from framework.train.checkpoint import load_model_state
from framework.train.engine import Callbacks, FitPlan, Loaders, fit, schedule_length
from framework.train.resume import resume_checkpoint, resume_record

log = logging.getLogger(__name__)

def _fresh_head(model: nn.Module, num_classes: int) -> None:
    """Replace the last linear layer by a freshly initialised one with `num_classes` outputs."""
    name, last = None, None
    for module_name, module in model.named_modules():
        if isinstance(module, nn.Linear):
            name, last = module_name, module
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, nn.Linear(last.in_features, num_classes, bias=last.bias is not None))


def keeps_head(scfg, target: dict, model_meta: dict, proxy_cfg, proxy_classes: int) -> str:
    """`kept` when the proxy's labels are the target's (same dataset name, same class count) and
    `search.head=auto`: the pretrained classifier already solves the proxy task. `fresh` otherwise."""
    same_labels = str(target.get("name")) == str(proxy_cfg.name) and int(model_meta.get("num_classes", -1)) == proxy_classes
    return "kept" if str(scfg.get("head", "auto")) == "auto" and same_labels else "fresh"


def search_budget(model: nn.Module, layers, scfg, total_params: int, fixed, fixed_bits) -> BudgetLimits | None:
    """The budget `search.*` sets (framework.policy.budget) for the supernet `model`, checked before
    any step against the cheapest policy of its search space: a budget below it is one error now,
    not after the search has trained (framework.policy.knapsack.check_budget_reachable)."""
    limits = budget_from_config(scfg, layers, fixed, fixed_bits)
    if str(scfg.complexity.penalty) == "hinge" and (limits is None or limits.bitops is None):
        raise MPQError("search.complexity.penalty=hinge needs a BitOps budget: set search.budget_bitops or "
                       "search.budget_uniform_bits (or search.complexity.penalty=linear)")
    if limits is not None:
        bits, _ = derive_bits(model)
        searched = {n: m for n, m in model.named_modules() if isinstance(m, (SearchConv2d, SearchLinear))}
        check_budget_reachable(layers, bits, {n: (m.w_candidates, m.a_candidates) for n, m in searched.items()},
                               limits, total_params, {n for n, m in searched.items() if m.joint})
        richest = {**bits, **{n: (max(m.w_candidates), max(m.a_candidates)) for n, m in searched.items()}}
        cost = cost_at(layers, richest, total_params, 1, 1)  # the layers are traced at the budget's resolution already
        if (limits.bitops is None or cost.bitops <= limits.bitops) and (limits.size_mb is None or cost.size_mb <= limits.size_mb):
            log.warning("the budget (%s) is met by every policy of the search space, the most expensive included "
                        "(%.4g GBitOps): the search cannot trade bits; lower search.budget_uniform_bits, "
                        "search.budget_bitops or search.budget_size_mb", limits.describe(), cost.gbitops)
    return limits


def check_search_budget(cfg: DictConfig) -> None:
    """The search budget against the search space of the untrained `cfg.model` at `cfg.data`'s
    geometry: what `mpq pipeline` checks before it pretrains, so an impossible budget costs nothing."""
    spec = get_dataset_spec(str(cfg.data.name))
    num_classes = spec.num_classes or build_dataset(cfg.data, "test").mpq_info["num_classes"]
    size, channels = int(cfg.data.input_size or 28), int(cfg.data.channels)
    model = build_model(model_meta(cfg, num_classes))
    layers = trace_layers(model, size, channels)
    fixed_bits = fixed_bits_of(cfg.search.quant)
    fixed = fixed_layer_names(layers, fixed_bits)
    total_params = float_parameter_count(model)
    try:
        build_supernet(model, layers, cfg.search.quant)
    except ValueError as err:
        raise MPQError(f"cannot build the search supernet from search.quant: {err}") from None
    search_budget(model, layers, cfg.search, total_params, fixed, fixed_bits)


def run_search(cfg: DictConfig, on_epoch: Callable[[dict[str, Any]], None] | None = None) -> Result:
    """Search a mixed-precision policy on the proxy data; writes policy.json, its plots and result.json.

    `on_epoch`, if given, is called after every epoch's validation with a copy of the epoch's entry
    plus `proxy_top1` (the supernet's proxy validation top-1), `expected_bitops` (the complexity
    model's expected BitOps at the target resolution, `framework.quant.expected_bitops`) and
    `total_steps`; a sweep reports it to its scheduler (framework.tune). Without it, nothing is
    reported per epoch.
    """
    stage = "search"
    scfg = cfg.search
    ckpt = load_full_precision_checkpoint(cfg, stage)
    run_dir, device = start_stage(cfg, stage)
    model_meta = dict(ckpt.meta["model"])
    target = ckpt.meta.get("data", {})
    target_size, channels = int(target.get("input_size") or 28), int(target.get("channels") or model_meta["in_channels"])

    proxy_cfg = cfg.proxy.copy()
    with open_dict(proxy_cfg):
        proxy_cfg.channels = channels  # the proxy is fed to the target model
        proxy_cfg.input_size = proxy_cfg.input_size or target_size
    proxy_train = build_dataset(proxy_cfg, "train")
    proxy_val = build_dataset(proxy_cfg, validation_split(proxy_cfg))  # held-out proxy training data
    proxy_classes = proxy_train.mpq_info["num_classes"]
    batch_size = int(scfg.batch_size or cfg.train.batch_size)
    train_loader = build_loader(proxy_train, batch_size, True, proxy_cfg, seed=int(cfg.seed))
    val_loader = build_loader(proxy_val, cfg.train.eval_batch_size, False, proxy_cfg)
    if len(train_loader) == 0:
        raise MPQError(f"the proxy set has {len(proxy_train)} samples, fewer than one batch; raise proxy.fraction")

    model = build_model({**model_meta, "in_channels": channels})
    load_model_state(model, ckpt)
    # costs are those of the target model (its own classifier), measured before the head is swapped
    layers = trace_layers(model, target_size, channels)  # MACs at the target resolution
    proxy_layers = trace_layers(model, int(proxy_cfg.input_size), channels)
    total_params = float_parameter_count(model)
    head = keeps_head(scfg, target, model_meta, proxy_cfg, proxy_classes)
    if head == "fresh":
        _fresh_head(model, proxy_classes)
    search_meta = {**model_meta, "num_classes": proxy_classes}

    qcfg = scfg.quant
    fixed_bits = fixed_bits_of(qcfg)
    fixed = fixed_layer_names(layers, fixed_bits)
    try:
        build_supernet(model, layers, qcfg)
    except ValueError as err:
        raise MPQError(f"cannot build the search supernet from search.quant: {err}") from None
    model.to(device)

    limits = search_budget(model, layers, scfg, total_params, fixed, fixed_bits)  # at the target resolution
    budget = limits.bitops if limits is not None else None
    penalty_mode = str(scfg.complexity.penalty)
    reference = budget if penalty_mode == "hinge" else float(
        sum(layer.macs * max(qcfg.candidates_w) * max(qcfg.candidates_a) for layer in layers)
    )
    searcher = SearchStep(model, scfg, proxy_classes, penalty_mode, reference, device, budget=budget)
    total_steps = schedule_length(train_loader, int(scfg.epochs), scfg.max_steps)
    searcher.schedule(total_steps)
    rule, last_terms = searcher.rule, searcher.last_terms

    candidates = {n: (m.w_candidates, m.a_candidates) for n, m in model.named_modules()
                  if isinstance(m, (SearchConv2d, SearchLinear))}
    tracker = open_tracker(cfg, stage)
    rho_trace: list[tuple[int, float]] = []  # the two-pass rule's radius at every two-pass step (ASGA's adapts)
    grad_norm_trace: list[tuple[int, float]] = []  # ||g|| of the first pass beside it (ASGA's gap scales with it)

    def on_step(step: int, loss: float, top1: float, info: dict[str, float]) -> None:
        if "rho" in info:
            rho_trace.append((step, float(info["rho"])))
            grad_norm_trace.append((step, float(info.get("grad_norm", float("nan")))))

    def on_epoch_end(epoch: int, entry: dict[str, Any]) -> None:
        entry.update(expected_gbitops=float(expected_bitops(model).detach()) / 1e9, **{
            k: v for k, v in last_terms.items() if k != "expected_gbitops"})
        if rule is not None:
            entry["rho"] = rule.rho
        _, probs = derive_bits(model)
        figure = plot_bit_probabilities(probs, candidates, run_dir / "figures" / f"bit_probabilities_epoch{epoch}.png")
        tracker.track_image("bit_probabilities", str(figure), step=epoch, subset="proxy")
        if on_epoch is not None:
            on_epoch({**entry, "proxy_top1": entry.get("val_top1"), "expected_bitops": entry["expected_gbitops"] * 1e9,
                      "total_steps": total_steps})

    meta = {"stage": stage, "model": search_meta, "data": {"name": str(proxy_cfg.name), "input_size": int(proxy_cfg.input_size),
            "channels": channels}, "search": True, "code_version": __version__}
    log.info("search %s (%s) on %s: %d proxy samples, %d steps, budget %s",
             model_meta["name"], scfg.method, proxy_cfg.name, len(proxy_train), total_steps,
             limits.describe() if limits is not None else "none")
    resume = resume_checkpoint(cfg, run_dir)
    if resume is not None:
        load_model_state(model, resume)
        searcher.load_state_dict(resume.training_state)
    started = time.time()
    try:
        fitted = fit(
            model, Loaders(train_loader, val_loader), searcher,
            FitPlan(total_steps, device, run_dir / "checkpoints", meta, tracker=tracker, val_every=1, val_subset="proxy",
                    checkpoint_every=int(cfg.checkpoint_every or 0)),
            hooks=[Callbacks(on_step=on_step, on_epoch_end=on_epoch_end)], resume=resume.training_state if resume is not None else None,
        )
        bits, probs = derive_bits(model)
        argmax = dict(bits)
        repair_record: dict[str, Any] = {"applied": False}
        if limits is not None and scfg.repair:  # the exact fit (`repair` in policy.json)
            joint = {n for n, m in model.named_modules() if isinstance(m, (SearchConv2d, SearchLinear)) and m.joint}
            bits, repair_record = fit_to_budget(layers, bits, probs, candidates, limits, total_params, joint,
                                                fill=float(scfg.budget_fill))
        proxy_cost = cost_at(proxy_layers, bits, total_params, int(proxy_cfg.input_size), channels)
        target_cost = cost_at(layers, bits, total_params, target_size, channels)
        decided = decisiveness(probs, argmax, bits, cost_at(layers, argmax, total_params, target_size, channels).bitops,
                               limits.bitops if limits is not None else None)
        provenance = {
            "method": str(scfg.method),
            "hyperparameters": OmegaConf.to_container(scfg, resolve=True),
            "proxy": {k: proxy_train.mpq_info.get(k) for k in ("dataset", "fraction", "per_class", "indices_hash", "size")}
            | {"seed": int(cfg.seed)},
            "init_checkpoint": str(ckpt.path),
            "target": {"dataset": target.get("name"), "input_size": target_size, "in_channels": channels},
            "probabilities": probs,
            "code_version": __version__,
        }
        policy = make_policy(
            model_meta["name"], layers, bits, fixed, {"proxy": proxy_cost, "target": target_cost},
            budget=limits.as_budget("target") if limits is not None else None, repair=repair_record, provenance=provenance,
        )
        artifacts = write_policy(policy, run_dir / "policy.json")
        artifacts["bit_probabilities"] = str(plot_bit_probabilities(probs, candidates, run_dir / "bit_probabilities.png"))
        tracker.track_image("policy", artifacts["policy_plot"], step=fitted.steps, subset="proxy")
        tracker.track("policy_gbitops", target_cost.gbitops, step=fitted.steps, subset="proxy")
    finally:
        tracker.close()
        searcher.close()
    average = policy.average_bits()
    searched_bits = {bits[n] for n in candidates}
    metrics = {
        "proxy_top1": fitted.final.get("top1"),
        "expected_gbitops": fitted.history[-1].get("expected_gbitops"),
        "gbitops": target_cost.gbitops,
        "bitops": target_cost.bitops,
        "size_mb": target_cost.size_mb,
        "proxy_gbitops": proxy_cost.gbitops,
        "budget_gbitops": budget / 1e9 if budget else None,
        "budget_size_mb": limits.size_mb if limits is not None else None,
        "repair_applied": bool(repair_record.get("applied")),  # the fitted policy differs from the argmax
        "avg_w_bits": average["w_bits"],
        "avg_a_bits": average["a_bits"],
        "uniform": len(searched_bits) <= 1,
        "entropy": decided["entropy"],  # mean normalised entropy of the final bit distributions
        "undecided": decided["undecided"],
        "argmax_bitops_ratio": decided["argmax_ratio"],
        "fit_changed_layers": len(decided["fit_changed"]),
        "steps": fitted.steps,
        "images_processed": searcher.images_processed,  # forward passes x images: two passes count twice
        "seconds": round(time.time() - started, 2),
    }
    if rule is not None:
        metrics["rho"] = rule.rho
    artifacts["checkpoint"] = str(run_dir / "checkpoints" / "last")
    result = Result(stage, metrics=metrics, artifacts=artifacts,
                    extra={"history": fitted.history, "proxy": proxy_train.mpq_info, "tracking": tracker.info(),
                           "decisiveness": decided, "head": head,
                           "rho_trace": rho_trace, "grad_norm_trace": grad_norm_trace, "resume": resume_record(cfg, run_dir, resume)})
    write_result(run_dir, result, cfg)
    return result
