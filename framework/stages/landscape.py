"""`mpq landscape`: loss-landscape diagnostics of a checkpoint (framework.landscape): the Hessian's
top eigenvalue, the surrogate gap and a 1-D loss curve, on fixed batches of the training split."""

from __future__ import annotations

import logging
import sys
import time

from omegaconf import DictConfig

from framework.data import build_dataset
from framework.errors import MPQError
from framework.landscape import (
    CrossEntropyOnBatches,
    evaluation,
    filter_normalized_direction,
    fixed_batches,
    landscape_parameters,
    loss_curve,
    surrogate_gap,
    top_hessian_eigenvalue,
)
from framework.results import Result
from framework.stage import (
    check_classes,
    checkpoint_geometry,
    checkpoint_model,
    data_config_at,
    finish_stage,
    start_stage,
)
from framework.track import open_tracker
from framework.track.figures import plot_loss_curve
from framework.train.checkpoint import load_checkpoint

log = logging.getLogger(__name__)


def run_landscape(cfg: DictConfig) -> Result:
    """The loss landscape of the checkpoint at `cfg.checkpoint` around its weights.

    The loss `L(w)` is the mean cross-entropy over `landscape.batches` batches of
    `landscape.batch_size` images of the training split of `cfg.data`, drawn once from `seed`
    without augmentation, with the model in evaluation mode: batch norm uses its running statistics,
    so `L` is a deterministic function of the weights. The weights are the conv/linear weights and
    biases and the batch-norm affine parameters; quantizer step sizes and ranges are held fixed
    (framework.landscape.params). Measured:

    1. the Hessian's largest eigenvalue by power iteration (`max_iters`, `tol`, `hold_graphs`), through the
       quantizers' straight-through estimator (framework.landscape.hessian);
    2. the surrogate gap `L(w + rho g/||g||) - L(w)` (`rho`);
    3. `L(w + t d)` for `points` values of `t` on [-`span`, `span`], `d` a filter-normalised random
       direction drawn from `seed` (Li et al. 2018): `loss_curve.png` and `curve` in result.json.

    A quantized checkpoint is measured under its own policy; `policy=` quantizes a full-precision one
    after training, as `mpq evaluate` does. The Hessian-vector products run the quantizers' reference
    ops (framework.quant.kernels.twice_differentiable).
    """
    if not cfg.checkpoint:
        raise MPQError("landscape needs checkpoint=<checkpoint directory>, "
                       "e.g. checkpoint=outputs/finetune/<run>/checkpoints/last")
    run_dir, device = start_stage(cfg, "landscape")
    settings = cfg.landscape
    ckpt = load_checkpoint(cfg.checkpoint)
    data_cfg = data_config_at(cfg.data, checkpoint_geometry(ckpt, cfg))
    train_set = build_dataset(data_cfg, "train", train_transforms=False)
    check_classes(ckpt, train_set.mpq_info, str(cfg.data.name), "pick the data=<name> it was trained on")
    model, policy, _ = checkpoint_model(ckpt, cfg, data_cfg, device, train_set)
    seed = int(cfg.seed)
    loss = CrossEntropyOnBatches(fixed_batches(train_set, settings.batches, settings.batch_size, seed, device))
    params = [p for _, p in landscape_parameters(model)]

    started = time.time()
    top = top_hessian_eigenvalue(model, loss, params, int(settings.max_iters), float(settings.tol), seed,
                                 hold_graphs=bool(settings.hold_graphs))
    hessian_seconds = time.time() - started
    gap = surrogate_gap(model, loss, params, float(settings.rho))
    direction = filter_normalized_direction(params, seed)
    curve = loss_curve(model, loss, params, direction, float(settings.span), int(settings.points))
    with evaluation(model):
        top1 = loss.top1(model)
    seconds = time.time() - started

    metrics = {
        "loss": gap.loss, "top1": top1, "samples": loss.samples, "batches": len(loss.batches),
        "parameters": sum(p.numel() for p in params),
        "hessian_top_eigenvalue": top.eigenvalue, "hessian_iterations": top.iterations,
        "hessian_rel_change": top.rel_change, "hessian_converged": top.converged,
        "surrogate_gap": gap.gap, "perturbed_loss": gap.perturbed_loss, "grad_norm": gap.grad_norm, "rho": gap.rho,
        "curve_min_t": curve.argmin, "curve_min_loss": min(curve.loss), "curve_max_loss": max(curve.loss),
        "hessian_seconds": round(hessian_seconds, 2), "seconds": round(seconds, 2),
    }
    if policy is not None:
        metrics.update({f"avg_{k}": v for k, v in policy.average_bits().items()})
    kind = "quantized" if policy is not None else "full-precision"
    plot = plot_loss_curve(curve.t, curve.loss, run_dir / "loss_curve.png",
                           f"{ckpt.meta['model']['name']} ({kind}), {loss.samples} training images, seed {seed}")

    tracker = open_tracker(cfg, "landscape")
    try:
        for name in ("loss", "top1", "hessian_top_eigenvalue", "surrogate_gap", "grad_norm", "curve_min_t"):
            tracker.track(name, metrics[name], step=0, subset="train")
        for step, estimate in enumerate(top.history, start=1):
            tracker.track("hessian_eigenvalue_estimate", estimate, step=step, subset="train")
        tracker.set("landscape_curve", {"t": curve.t, "loss": curve.loss})
        tracker.track_image("loss_curve", str(plot), step=0, subset="train")
    finally:
        tracker.close()

    summary = (
        f"landscape of {ckpt.path} ({kind}) on {loss.samples} training images: loss {gap.loss:.4f}, "
        f"Hessian top eigenvalue {top.eigenvalue:.4g} ({top.iterations} iterations"
        + (f", relative change {top.rel_change:.1e}" if top.rel_change is not None else "")
        + ("" if top.converged else ", not converged")
        + f"), surrogate gap {gap.gap:.4g} at rho={gap.rho:g}, curve minimum at t={curve.argmin:+.2f}; {seconds:.1f} s"
    )
    report(summary)
    result = Result("landscape", metrics=metrics, artifacts={"loss_curve": str(plot), "checkpoint": str(ckpt.path)},
                    extra={"curve": {"t": curve.t, "loss": curve.loss, "span": float(settings.span)},
                           "hessian_history": top.history, "summary": summary, "data": train_set.mpq_info,
                           "model": ckpt.meta["model"], "quantized": policy is not None, "tracking": tracker.info()})
    return finish_stage(run_dir, result, cfg)


def report(line: str) -> None:
    """Log `line` (under `mpq`, Hydra's log file and console) and print it where no log handler
    writes to the console (a stage called from Python), so the console shows it once."""
    log.info(line)
    handlers = logging.getLogger().handlers
    if not any(type(h) is logging.StreamHandler and getattr(h, "stream", None) in (sys.stdout, sys.stderr)
               for h in handlers) or not log.isEnabledFor(logging.INFO):
        print(line)
