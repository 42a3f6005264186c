"""`mpq prepare`: the FFCV `.beton` files that `data.loader=ffcv` reads."""

from __future__ import annotations

import time

from omegaconf import DictConfig

from framework.data.beton import prepare_betons
from framework.results import Result
from framework.stage import finish_stage, run_directory


def run_prepare(cfg: DictConfig) -> Result:
    """Write the FFCV `.beton` files `data.loader=ffcv` reads: the `prepare.splits` of `cfg.data`
    (and of `cfg.proxy` with `prepare.proxy=true`), with the write options of `data.ffcv.write`
    (`proxy.ffcv.write` for the proxy's). A proxy that reads the data's own files is written once.

    Files that exist, are whole and were written with the same options are skipped unless
    `prepare.force=true` (:func:`framework.data.beton.write_beton`). `artifacts` maps
    `<dataset>_<split>` to each file; `metrics` counts the files written and skipped.
    """
    run_dir = run_directory(cfg, "prepare")
    splits, force = list(cfg.prepare.splits), bool(cfg.prepare.force)
    started = time.time()
    reports = prepare_betons(cfg.data, splits, force)
    if cfg.prepare.proxy:
        done = {r["path"] for r in reports}
        reports += [r for r in prepare_betons(cfg.proxy, splits, force) if r["path"] not in done]
    metrics = {"written": sum(r["status"] == "written" for r in reports),
               "skipped": sum(r["status"] == "skipped" for r in reports),
               "bytes": sum(int(r["bytes"]) for r in reports), "seconds": round(time.time() - started, 2)}
    result = Result("prepare", metrics=metrics, artifacts={f"{r['dataset']}_{r['split']}": r["path"] for r in reports},
                    extra={"files": reports})
    return finish_stage(run_dir, result, cfg)
