"""`launcher=ray`: run a stage on a Ray cluster as a Ray Train `TorchTrainer`, and wait for it.

The `mpq` process is Ray Train's driver: it joins the cluster (`launcher.address`: null starts a
private Ray on 127.0.0.1, `auto` joins the one `ray start` left on this machine or `RAY_ADDRESS`,
`host:port` joins that head), checks that every node reads and writes the run directory (which must
be on storage the whole cluster sees), and starts `dist.nproc` workers for pretrain and finetune (one
for the other stages) with `launcher.cpus_per_worker` / `launcher.gpus_per_worker` each, placed by
`launcher.placement_strategy` (or `launcher.workers_per_node`). Ray Train creates the process group
(gloo on the CPU, NCCL on CUDA) and each worker learns its rank from Ray Train's context
(framework.dist.ranks); the stage itself runs unchanged: the DeepSpeed engine, ZeRO 0-2, the
two-pass step under data parallelism and `global batch = micro-batch x accumulation x processes`.
Rank 0 writes `result.json`, the checkpoints and the Aim run, as with every other launcher.

Failures: when a worker dies, Ray Train ends the worker group and starts a new one (up to
`launcher.max_failures` times); the new workers find the `checkpoints/last` this launch wrote and
resume from it (`checkpoint_every` sets how much work a crash can lose). A mistake in the run (a
missing dataset, a bad checkpoint) is not retried: rank 0 writes the error to `result.json` and the
workers end. SIGINT, SIGTERM or SIGUSR1 (Slurm's warning) to the driver asks the workers (through a stop file in the run
directory: their training runs outside the main thread and gets no signals) to save
`checkpoints/last` and stop; the run ends with status `interrupted`, and `resume=true` continues it.

`mpq pipeline launcher=ray` runs in the driver and sends each training and evaluation stage to
the cluster this way, and the sweep (`pipeline.sweep=true`) to the same cluster through Ray Tune.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import signal
import sys
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf, open_dict

from framework.errors import MPQError
from framework.results import Result, read_result

log = logging.getLogger(__name__)

#: what the driver writes to ask the workers to checkpoint and stop
STOP_FILE = ".mpq-ray-stop"
STORAGE_PROBE_S = 60.0


@contextlib.contextmanager
def ray_cluster(cfg: DictConfig) -> Iterator[dict[str, Any]]:
    """Ray connected as `cfg.launcher` says, for the block (a private Ray is stopped afterwards, a
    cluster is left running)."""
    from framework.tune.cluster import TRAIN_WORKER_ENV, loopback, ray_connection

    lcfg = cfg.launcher
    interface = os.environ.get("GLOO_SOCKET_IFNAME") or ("lo" if loopback(lcfg.address) else None)
    env_vars = {"GLOO_SOCKET_IFNAME": interface} if interface else {}
    with ray_connection(lcfg.address, lcfg.num_cpus, None, key="launcher.address", env_vars=env_vars,
                        worker_env=TRAIN_WORKER_ENV) as info:
        yield info


def check_shared_storage(run_dir: Path) -> None:
    """One error unless every alive node of the cluster reads a file this process wrote in
    `run_dir` and writes one beside it: checkpoints and `result.json` written by rank 0 (on any node)
    must be where the driver and a restarted worker (on another node) look for them."""
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    token = uuid.uuid4().hex
    probe_dir = Path(run_dir).resolve() / ".mpq-storage-check"
    probe_dir.mkdir(parents=True, exist_ok=True)
    (probe_dir / "driver").write_text(token)

    @ray.remote(num_cpus=0, max_retries=0)
    def probe(folder: str, expected: str, node: str) -> str | None:
        import socket

        try:
            seen = (Path(folder) / "driver").read_text()
        except OSError as err:
            return f"cannot read {folder} ({err.strerror or err})"
        if seen != expected:
            return f"sees another {folder} (not the driver's files)"
        try:
            (Path(folder) / f"node-{node}").write_text(socket.gethostname())
        except OSError as err:
            return f"cannot write in {folder} ({err.strerror or err})"
        return None

    nodes = [n for n in ray.nodes() if n.get("Alive")]
    probes = [probe.options(scheduling_strategy=NodeAffinitySchedulingStrategy(n["NodeID"], soft=False))
              .remote(str(probe_dir), token, n["NodeID"][:12]) for n in nodes]
    try:
        problems = ray.get(probes, timeout=STORAGE_PROBE_S)
    except ray.exceptions.GetTimeoutError:
        raise MPQError(f"launcher=ray: the nodes did not answer the run directory check within {STORAGE_PROBE_S:.0f} s; "
                       f"is the cluster busy? (launcher.storage_check=false skips the check)") from None
    for node, problem in zip(nodes, problems, strict=True):
        if problem:
            raise MPQError(f"launcher=ray: the Ray node {node['NodeManagerAddress']} ({node['NodeID'][:12]}) {problem}: the run "
                           f"directory must be on storage every node of the cluster sees; set hydra.run.dir to a shared "
                           f"path (NFS, a shared volume)")
    for path in probe_dir.iterdir():
        path.unlink(missing_ok=True)
    probe_dir.rmdir()


def _workers(cfg: DictConfig, stage: str) -> int:
    """`dist.nproc` for the stages that train on several processes (the registry's `distributed`), else 1."""
    from framework.stages import get_stage

    return int(cfg.dist.nproc) if get_stage(stage).distributed else 1


def _placement(cfg: DictConfig, workers: int) -> str:
    per_node = cfg.launcher.workers_per_node
    if per_node == 1 and workers > 1:
        return "STRICT_SPREAD"
    if per_node and per_node == workers:
        return "STRICT_PACK"
    return str(cfg.launcher.placement_strategy)


def _check_resources(cfg: DictConfig, workers: int) -> None:
    """One error when the cluster can never hold the workers (instead of Ray waiting forever)."""
    import ray

    lcfg = cfg.launcher
    total = ray.cluster_resources()
    cpus, gpus = float(lcfg.cpus_per_worker) * workers, float(lcfg.gpus_per_worker) * workers
    if cpus > total.get("CPU", 0) or gpus > total.get("GPU", 0):
        raise MPQError(f"launcher=ray: {workers} workers need {cpus:g} CPUs and {gpus:g} GPUs, but the cluster has "
                       f"{total.get('CPU', 0):g} CPUs and {total.get('GPU', 0):g} GPUs; lower dist.nproc or "
                       f"launcher.cpus_per_worker, or add nodes")
    if _placement(cfg, workers) == "STRICT_SPREAD":
        alive = sum(1 for n in ray.nodes() if n.get("Alive"))
        if alive < workers:
            raise MPQError(f"launcher=ray: one worker per node (launcher.workers_per_node=1 or STRICT_SPREAD) needs "
                           f"{workers} nodes; the cluster has {alive}")


def train_worker(config: dict[str, Any]) -> None:
    """What every Ray Train worker runs: the stage, in this process, on the config the driver sent.

    A worker group that Ray Train starts again after a crash resumes from the `checkpoints/last`
    this launch wrote (its mtime is after the launch began). A mistake (MPQError) ends the run
    without a restart; a lost peer and any other exception are crashes, which Ray Train restarts.
    """
    from framework.dist.ranks import RAY_TRAIN_MARKER, current_ranks
    from framework.results import write_stopped_result
    from framework.stages import get_stage
    from framework.stages.training import LostPeer
    from framework.train.resume import STOP_FILE_ENV, Interrupted

    os.environ[RAY_TRAIN_MARKER] = "1"
    stage = config["stage"]
    cfg = OmegaConf.create(config["cfg"])
    run_dir = Path(cfg.run_dir)
    os.environ[STOP_FILE_ENV] = str(run_dir / STOP_FILE)
    last = run_dir / "checkpoints" / "last" / "training.pt"
    restarted = last.exists() and last.stat().st_mtime >= float(config["launched_at"])
    with open_dict(cfg):
        cfg.launcher = {"name": "local"}
        cfg.resume = bool(cfg.resume) or restarted
        if not cfg.threads:
            cfg.threads = max(1, int(float(config["cpus_per_worker"]) or 1))
    os.chdir(config["cwd"])  # Ray Train starts workers in its own folder: relative paths are the user's
    ranks = current_ranks()
    handlers: list[logging.Handler] = [logging.StreamHandler()]
    if ranks.is_main:  # the stage's log in its run directory, as Hydra writes it for the other launchers
        run_dir.mkdir(parents=True, exist_ok=True)
        handlers.append(logging.FileHandler(run_dir / f"{stage}.log"))
    logging.basicConfig(level=logging.INFO if ranks.is_main else logging.WARNING, handlers=handlers,
                        format="[%(asctime)s][%(name)s][%(levelname)s] - %(message)s", force=True)
    if restarted and ranks.is_main:
        log.warning("launcher=ray: the workers were restarted; resuming from %s", last.parent)

    _record_workers(run_dir, ranks)

    try:
        get_stage(stage).function(cfg)
    except Interrupted as err:
        write_stopped_result(run_dir, stage, "interrupted", str(err), cfg, ranks.rank,
                             artifacts={"checkpoint": str(err.checkpoint)}, step=err.step)
    except LostPeer:
        raise  # Ray Train ends the group and, within launcher.max_failures, starts it again
    except MPQError as err:
        write_stopped_result(run_dir, stage, "error", str(err), cfg, ranks.rank, **getattr(err, "details", {}))


WORKERS_LOG = Path("ray") / "workers.jsonl"


def _record_workers(run_dir: Path, ranks) -> None:
    """Append where this worker group runs (rank, Ray node, host, pid of every worker) to
    `ray/workers.jsonl` in the run directory: one line per start, so a restart shows as a second."""
    import socket

    import ray
    import torch.distributed as torch_dist

    me = {"rank": ranks.rank, "node_id": ray.get_runtime_context().get_node_id(), "host": socket.gethostname(),
          "pid": os.getpid()}
    everyone: list[Any] = [me]
    if torch_dist.is_initialized() and torch_dist.get_world_size() > 1:
        everyone = [None] * torch_dist.get_world_size()
        torch_dist.all_gather_object(everyone, me)
    if ranks.is_main:
        path = run_dir / WORKERS_LOG
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(path, "a") as handle:
            handle.write(json.dumps({"started": time.time(), "workers": everyone}) + "\n")


def read_worker_groups(run_dir: Path, since: float = 0.0) -> list[dict[str, Any]]:
    """The worker groups `ray/workers.jsonl` records (started at or after `since`), oldest first."""
    try:
        lines = (Path(run_dir) / WORKERS_LOG).read_text().splitlines()
    except OSError:
        return []
    groups = [json.loads(line) for line in lines if line.strip()]
    return [g for g in groups if g["started"] >= since]


def _fit(trainer, outcome: dict[str, Any]) -> None:
    try:
        outcome["result"] = trainer.fit()
    except BaseException as err:  # reported by the waiting thread
        outcome["error"] = err


def _failure_line(err: BaseException, max_failures: int) -> str:
    """One line for a Ray Train failure: the workers' last error, without its traceback."""
    text = str(err)
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    errors = [line for line in lines if "Error" in line or "error" in line]
    last = errors[-1] if errors else (lines[-1] if lines else type(err).__name__)
    return f"the Ray Train workers failed {max_failures + 1} time(s) (launcher.max_failures={max_failures}); last: {last[:400]}"


def run_stage_on_ray(cfg: DictConfig, stage: str, run_dir: Path, mode: str = "cluster") -> Result:
    """Run `stage` on `cfg` as a TorchTrainer on the connected Ray cluster and wait; its Result as
    rank 0 wrote it to `run_dir/result.json`. An error or an interruption of the stage is raised as
    the MPQError (or Interrupted) the stage raised, in one line."""
    from ray.train import FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    from framework.results import atomic_write_text
    from framework.stage import sub_config
    from framework.train.resume import Interrupted

    lcfg = cfg.launcher
    run_dir = Path(run_dir).resolve()
    run_dir.mkdir(parents=True, exist_ok=True)
    workers = _workers(cfg, stage)
    _check_resources(cfg, workers)
    if lcfg.storage_check:
        check_shared_storage(run_dir)
    stop_file = run_dir / STOP_FILE
    stop_file.unlink(missing_ok=True)
    result_path = run_dir / "result.json"
    result_path.unlink(missing_ok=True)  # what is there afterwards is this launch's
    sub = sub_config(cfg, run_dir)
    launched_at = time.time() - 1
    resources = {"CPU": float(lcfg.cpus_per_worker)}
    if float(lcfg.gpus_per_worker) > 0:
        resources["GPU"] = float(lcfg.gpus_per_worker)
    trainer = TorchTrainer(
        train_worker,
        train_loop_config={"stage": stage, "cfg": OmegaConf.to_container(sub, resolve=True), "launched_at": launched_at,
                           "cwd": os.getcwd(),
                           "cpus_per_worker": float(lcfg.cpus_per_worker)},
        torch_config=TorchConfig(backend=None if cfg.dist.backend == "auto" else str(cfg.dist.backend),
                                 timeout_s=int(60 * float(cfg.dist.timeout_min))),
        scaling_config=ScalingConfig(num_workers=workers, use_gpu=float(lcfg.gpus_per_worker) > 0,
                                     resources_per_worker=resources, placement_strategy=_placement(cfg, workers)),
        run_config=RunConfig(name=f"mpq-{stage}", storage_path=str(run_dir / "ray"),
                             failure_config=FailureConfig(max_failures=int(lcfg.max_failures))),
    )
    print(f"mpq {stage}: starting {workers} Ray Train worker(s) ({_placement(cfg, workers)}, "
          f"{float(lcfg.cpus_per_worker):g} CPU / {float(lcfg.gpus_per_worker):g} GPU each)", file=sys.stderr, flush=True)
    outcome: dict[str, Any] = {}
    fitting = threading.Thread(target=_fit, args=(trainer, outcome), name="ray-train-fit", daemon=True)
    fitting.start()
    stopped: list[str] = []

    def ask_to_stop(signum, frame) -> None:
        stopped.append(signal.Signals(signum).name)
        stop_file.write_text(stopped[0] + "\n")
        print(f"mpq {stage}: {stopped[0]}: asking the workers to save checkpoints/last and stop", file=sys.stderr, flush=True)

    previous = {}
    if threading.current_thread() is threading.main_thread():
        previous = {sig: signal.signal(sig, ask_to_stop) for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGUSR1)}
    try:
        while fitting.is_alive():
            fitting.join(0.5)
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        stop_file.unlink(missing_ok=True)
    try:
        payload = read_result(run_dir)
    except (OSError, ValueError):
        payload = None
    if payload is None or payload.get("status") not in ("ok", "error", "interrupted"):
        if "error" in outcome:
            raise MPQError(_failure_line(outcome["error"], int(lcfg.max_failures))) from None
        raise MPQError(f"the Ray Train workers ended without a result in {run_dir}")
    if payload["status"] == "interrupted":
        checkpoint = Path(payload.get("artifacts", {}).get("checkpoint") or run_dir / "checkpoints" / "last")
        raise Interrupted(stopped[0] if stopped else "stop request", checkpoint, int(payload.get("step") or 0))
    if payload["status"] == "error":
        raise MPQError(str(payload.get("error")))
    groups = read_worker_groups(run_dir, since=launched_at)
    payload["ray"] = {"mode": mode, "placement": _placement(cfg, workers), "restarts": max(0, len(groups) - 1),
                      "workers": groups[-1]["workers"] if groups else []}
    atomic_write_text(result_path, json.dumps(payload, indent=2, default=str) + "\n")
    known = {"stage", "status", "metrics", "artifacts", "config"}
    return Result(stage, metrics=payload.get("metrics", {}), artifacts=payload.get("artifacts", {}),
                  extra={k: v for k, v in payload.items() if k not in known})


def submit_stage(cfg: DictConfig, stage: str, run_dir: Path) -> None:
    """`mpq <stage> launcher=ray`: the stage on the cluster; the pipeline runs here and sends its
    stages there (and its sweep, through Ray Tune, to the same cluster)."""
    from framework.stages import get_stage

    with ray_cluster(cfg) as info:
        resources = info["resources"]
        print(f"mpq {stage}: Ray {info['mode']} ({resources.get('CPU', 0):g} CPUs, {resources.get('GPU', 0):g} GPUs)",
              file=sys.stderr, flush=True)
        if stage == "pipeline":
            get_stage(stage).function(cfg, run_stage=lambda name, sub: run_stage_on_ray(sub, name, Path(sub.run_dir), info["mode"]))
            return
        result = run_stage_on_ray(cfg, stage, run_dir, info["mode"])
    print(f"mpq {stage}: finished on Ray with status {result.status}; result in {Path(run_dir) / 'result.json'}",
          file=sys.stderr)
