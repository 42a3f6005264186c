"""`mpq cost`: MACs, BitOps and size of a model under a policy at an input size, without data."""

from __future__ import annotations

from omegaconf import DictConfig

from framework.policy import Policy, write_policy
from framework.results import Result
from framework.stage import Geometry, build_model, finish_stage, model_meta, resolve_policy, run_directory
from framework.track import open_tracker


def run_cost(cfg: DictConfig) -> Result:
    """MACs, BitOps and size of `cfg.model` under `cfg.policy` at `input_size` x `in_channels`, no data.

    `policy` is `uniform:W/A` (default 8/8), `random:<seed>`, `uniform-budget` (both under the
    `search` budget and candidates) or a `policy.json`. Prints a per-layer table; writes the
    policy (as applied, with its plot) and `result.json` with `metrics.macs`, `bitops`, `size_mb`.
    """
    run_dir = run_directory(cfg, "cost")
    input_size = int(cfg.input_size or cfg.data.input_size or 224)
    in_channels = int(cfg.in_channels)
    num_classes = int(cfg.num_classes or cfg.model.num_classes)
    meta = {**model_meta(cfg, num_classes), "in_channels": in_channels}
    spec = str(cfg.policy or "uniform:8/8")
    policy, layers = resolve_policy(spec, meta["name"], lambda: build_model(meta), Geometry(input_size, in_channels), cfg.quant,
                                    search_cfg=cfg.search)
    total = policy.cost["target"]
    print(format_cost_table(policy, layers, input_size, in_channels))
    artifacts = write_policy(policy, run_dir / "policy.json")
    tracker = open_tracker(cfg, "cost")
    try:
        for key in ("gmacs", "gbitops", "size_mb"):
            tracker.track(key, getattr(total, key) if hasattr(total, key) else total.model_extra[key], step=0, subset="val")
        tracker.track_image("policy", artifacts["policy_plot"], step=0, subset="val")
    finally:
        tracker.close()
    metrics = {
        "macs": total.macs, "gmacs": total.macs / 1e9, "bitops": total.bitops, "gbitops": total.gbitops,
        "size_mb": total.size_mb, "layers": len(layers), "input_size": input_size, "in_channels": in_channels,
        **{f"avg_{k}": v for k, v in policy.average_bits().items()},
    }
    result = Result("cost", metrics=metrics, artifacts=artifacts,
                    extra={"model": meta, "policy_spec": spec, "tracking": tracker.info()})
    return finish_stage(run_dir, result, cfg)


def format_cost_table(policy: Policy, layers: list, input_size: int, in_channels: int) -> str:
    """The per-layer table `mpq cost` prints."""
    head = f"{'layer':<28}{'kind':<7}{'W/A':>7}{'MMACs':>10}{'params':>10}{'MBitOps':>11}"
    lines = [f"{policy.model} at {in_channels}x{input_size}x{input_size}", head, "-" * len(head)]
    for layer in layers:
        entry = policy.layers[layer.name]
        mark = "*" if entry.fixed else ""
        lines.append(
            f"{layer.name:<28.28}{layer.kind:<7}{f'{entry.w_bits}/{entry.a_bits}{mark}':>7}{layer.macs / 1e6:>10.2f}"
            f"{layer.params:>10d}{layer.macs * entry.w_bits * entry.a_bits / 1e6:>11.1f}"
        )
    total = policy.cost["target"]
    lines += [
        "-" * len(head),
        f"total: {total.macs / 1e9:.4f} GMACs, {total.gbitops:.3f} GBitOps, {total.size_mb:.3f} MB"
        + ("   (* fixed layer)" if any(e.fixed for e in policy.layers.values()) else ""),
    ]
    return "\n".join(lines)
