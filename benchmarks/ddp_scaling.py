"""Data-parallel scaling on the CPU: 2 processes against 1 at the same global batch.

Measures, in one run, the wall time of one *global* optimizer step of ResNet-20 on Fashion-MNIST
(28x28 gray, 10 classes, the project's ``data=fashion_mnist`` with its augmentation) at a global
batch of 256 by default, trained the way ``pretrain`` / ``finetune`` train:

- ``1 proc``: one process with one torch thread takes the whole global batch;
- ``2 procs``: two processes with one torch thread each take half of it (``dist.nproc=2``).

Both sides go through the framework's own machinery: the process group of
``framework.dist.process_group.open_process_group`` (gloo; a world of one for one process), the
batch split of ``framework.dist.engine.batch_geometry``, the DeepSpeed engine of
``framework.dist.engine.build_engine`` (fp32, ZeRO stage 0 by default), each rank's shard of every
global batch from ``framework.data.build_loader``, the optimizer and schedule of
``conf/train/default.yaml``, and each step through ``framework.sharpness.EngineTwoPass``, for

- ``sgd``: plain steps (no sharpness rule, one forward and backward per step);
- ``asga``: ASGA's two-pass step on every step (the rule of ``conf/search/asga.yaml``, rho0 = 0.05).

Both sides run as workers started by torch's elastic launcher, as ``dist.nproc=N`` starts them
(``framework.dist.launch``: c10d rendezvous on 127.0.0.1 at a free port, gloo on the loopback
interface); the script starts itself with ``--worker``, so the 1-process side pays the same kind of
start-up. Each worker builds a fresh model and engine per rule, takes ``--warmup`` steps, then
times ``--steps`` steps with ``time.perf_counter()`` between two barriers (so the slower rank is
counted) and includes loading the batch, as training does. Rank 0 writes the time per step (the mean
over ranks) to a JSON file the launching process reads. The 1-process and 2-process sides alternate
over ``--rounds`` rounds (the first side and the order of the rules rotate from round to round) and
the median per side is reported.

Perfect scaling would be 0.5x; the target is 2 processes <= 0.65x the time of 1 for every rule.
It needs 2 free cores: on a loaded machine the two workers share cores and the ratio means little.

    .venv/bin/python benchmarks/ddp_scaling.py [--global-batch 256] [--steps 10] [--warmup 3] [--rounds 2]

``--json`` writes the figures with the machine, the target and whether it is met per rule
(``benchmarks/common.py``). The last line printed is ``ratio: sgd=<x> asga=<y>`` (2 processes over 1,
per rule).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from importlib import metadata
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # benchmarks.common, when run as a script
from benchmarks.common import figure, make_result, write_json  # noqa: E402

TARGET = 0.65  # max time per global step of 2 processes over 1 process
RULES = ("sgd", "sam", "asam", "asga")  # sgd: no sharpness rule; saq needs a quantized model


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--global-batch", type=int, default=256, help="samples per optimizer step over all processes")
    parser.add_argument("--steps", type=int, default=10, help="timed steps per rule, side and round")
    parser.add_argument("--warmup", type=int, default=3, help="untimed steps before the clock starts")
    parser.add_argument("--rounds", type=int, default=2, help="rounds of alternating 1-process and 2-process runs")
    parser.add_argument("--model", default="resnet20", help="a conf/model/ entry")
    parser.add_argument("--rules", default="sgd,asga", help=f"comma-separated, from: {', '.join(RULES)}")
    parser.add_argument("--zero-stage", type=int, default=0, choices=(0, 1, 2))
    parser.add_argument("--json", type=Path, default=None, help="also write the figures here")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--out", type=Path, default=None, help=argparse.SUPPRESS)
    parser.add_argument("--round", type=int, default=0, help=argparse.SUPPRESS)
    args = parser.parse_args()
    args.rule_names = [r.strip() for r in args.rules.split(",") if r.strip()]
    unknown = [r for r in args.rule_names if r not in RULES]
    if unknown or not args.rule_names:
        parser.error(f"--rules: unknown {', '.join(unknown) or '(none given)'}; choose from {', '.join(RULES)}")
    if args.global_batch % 2:
        parser.error("--global-batch must be even (it is split over 2 processes)")
    if args.steps < 1 or args.warmup < 0 or args.rounds < 1:
        parser.error("--steps and --rounds must be >= 1, --warmup >= 0")
    return args


def cores() -> int:
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1


# -- the worker (one of the 1 or 2 processes the elastic launcher starts) -------------------------------

def _config(model: str):
    from hydra import compose, initialize_config_dir

    from framework.paths import CONF_DIR

    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        return compose("config", overrides=["stage=pretrain", "data=fashion_mnist", f"model={model}", "search=asga"])


def _rule(name: str, cfg):

    from framework.sharpness import build_rule

    if name == "sgd":
        return None
    rule = cfg.search.sharpness.copy()
    rule.name = name
    return build_rule(rule)


def _endless(loader):
    """The loader's global batches (this rank's share), epoch after epoch."""
    epoch = 1
    while True:
        loader.sampler.set_epoch(epoch)
        yield from loader
        epoch += 1


def _time_rule(name: str, cfg, train_set, ranks, args) -> float:
    """Seconds per global optimizer step of rule `name` on this world (the mean over ranks)."""
    from omegaconf import OmegaConf
    from torch import nn

    from framework.data import build_loader
    from framework.dist.engine import batch_geometry, build_engine
    from framework.dist.process_group import all_reduce_mean, barrier
    from framework.models import create_model
    from framework.sharpness import EngineTwoPass
    from framework.train.optim import build_optimizer, build_scheduler

    device = torch.device("cpu")
    dist_cfg = cfg.dist.copy()
    dist_cfg.zero_stage, dist_cfg.gradient_accumulation, dist_cfg.precision = args.zero_stage, 1, "fp32"
    geometry = batch_geometry(args.global_batch, dist_cfg, ranks.world_size, "--global-batch")
    loader = build_loader(train_set, geometry.micro_batch, True, cfg.data, seed=0, accumulation=geometry.accumulation,
                          rank=ranks.rank, world_size=ranks.world_size)
    torch.manual_seed(0)
    options = OmegaConf.to_container(cfg.model.options, resolve=True)
    model = create_model(str(cfg.model.name), num_classes=int(train_set.mpq_info["num_classes"]),
                         in_channels=int(cfg.data.channels), **options).to(device)
    optimizer = build_optimizer(model, cfg.train.optim)
    scheduler = build_scheduler(optimizer, args.warmup + args.steps, cfg.train.optim)
    rule = _rule(name, cfg)
    engine = build_engine(model, optimizer, scheduler, geometry, dist_cfg, device, two_pass=rule is not None)
    two_pass = EngineTwoPass(engine, model, rule, period=1)
    criterion = nn.CrossEntropyLoss()
    batches = _endless(loader)

    def step() -> None:
        images, labels = next(batches)
        for x, y in zip(images.split(geometry.micro_batch), labels.split(geometry.micro_batch), strict=True):
            two_pass.micro_step(lambda net, x=x, y=y: criterion(net(x), y))

    model.train()
    for _ in range(args.warmup):
        step()
    barrier()
    start = time.perf_counter()
    for _ in range(args.steps):
        step()
    barrier()
    seconds = (time.perf_counter() - start) / args.steps
    (seconds,) = all_reduce_mean([seconds])
    return seconds


def worker(args: argparse.Namespace) -> None:
    torch.set_num_threads(1)
    from framework.data import build_dataset
    from framework.dist.process_group import open_process_group

    cfg = _config(args.model)
    train_set = build_dataset(cfg.data, "train")
    names = args.rule_names
    shift = args.round % len(names)
    with open_process_group(torch.device("cpu")) as ranks:
        seconds = {name: _time_rule(name, cfg, train_set, ranks, args) for name in names[shift:] + names[:shift]}
        if ranks.is_main:
            args.out.write_text(json.dumps({
                "world_size": ranks.world_size, "threads": torch.get_num_threads(), "s_per_step": seconds,
            }))


# -- the launching process ------------------------------------------------------------------------------

def launch(nproc: int, args: argparse.Namespace, out: Path, round_: int) -> dict:
    """Start `nproc` workers of this script through torch's elastic launcher; rank 0's figures."""
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.launcher.api import LaunchConfig, elastic_launch

    from framework.dist.launch import free_port

    config = LaunchConfig(
        min_nodes=1, max_nodes=1, nproc_per_node=nproc, run_id=f"ddp-scaling-{os.getpid()}-{round_}-{nproc}",
        rdzv_backend="c10d", rdzv_endpoint=f"127.0.0.1:{free_port()}", local_addr="127.0.0.1",
        max_restarts=0, monitor_interval=0.5,
    )
    argv = [str(Path(__file__).resolve()), "--worker", "--out", str(out), "--round", str(round_),
            "--global-batch", str(args.global_batch), "--steps", str(args.steps), "--warmup", str(args.warmup),
            "--model", args.model, "--rules", ",".join(args.rule_names), "--zero-stage", str(args.zero_stage)]
    try:
        elastic_launch(config, sys.executable)(*argv)
    except ChildFailedError as err:
        rank, failure = sorted(err.failures.items())[0]
        raise SystemExit(f"round {round_}, {nproc} process(es): rank {rank} exited with code {failure.exitcode}") from None
    return json.loads(out.read_text())


def main() -> None:
    args = parse_args()
    if args.worker:
        worker(args)
        return
    os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
    os.environ.setdefault("LOGLEVEL", "WARNING")
    for name in ("OMP_NUM_THREADS", "MKL_NUM_THREADS"):  # the workers' one thread each, before torch starts
        os.environ[name] = "1"
    try:
        _config(args.model)  # a wrong --model fails here, not in every worker
    except Exception as err:  # hydra's MissingConfigException and friends
        raise SystemExit(f"--model {args.model}: {str(err).splitlines()[0]}") from None
    names = args.rule_names
    times: dict[int, dict[str, list[float]]] = {n: {name: [] for name in names} for n in (1, 2)}
    with tempfile.TemporaryDirectory(prefix="ddp-scaling-") as tmp:
        for r in range(args.rounds):
            for nproc in ((1, 2) if r % 2 == 0 else (2, 1)):
                figures = launch(nproc, args, Path(tmp) / f"round{r}-{nproc}.json", r)
                if figures["world_size"] != nproc or figures["threads"] != 1:
                    raise SystemExit(f"a {nproc}-process worker ran with world size {figures['world_size']} "
                                     f"and {figures['threads']} threads")
                for name, seconds in figures["s_per_step"].items():
                    times[nproc][name].append(seconds)
    median = {n: {name: statistics.median(values) for name, values in per_rule.items()} for n, per_rule in times.items()}
    ratio = {name: median[2][name] / median[1][name] for name in names}

    print(f"torch {torch.__version__}, deepspeed {metadata.version('deepspeed')}, {cores()} cores available "
          f"({os.cpu_count()} on the machine), gloo, ZeRO stage {args.zero_stage}, fp32")
    print(f"{args.model} on fashion_mnist, global batch {args.global_batch} (2 procs: {args.global_batch // 2} each), "
          f"1 torch thread per process, {args.rounds} rounds x {args.steps} steps after {args.warmup} warm-up")
    if cores() < 2:
        print("warning: fewer than 2 cores; the 2 processes share one and the ratio means little")
    print(f"{'rule':<8}{'1 proc s/step':>15}{'2 procs s/step':>16}{'ratio':>8}{f'<= {TARGET}':>9}")
    for name in names:
        met = "yes" if ratio[name] <= TARGET else "no"
        print(f"{name:<8}{median[1][name]:>15.3f}{median[2][name]:>16.3f}{ratio[name]:>8.2f}{met:>9}")
    if args.json:
        figures = [figure(f"2 processes / 1 process, time per global step, {name.upper()} ({args.model}, global batch "
                          f"{args.global_batch}, {args.rounds} rounds x {args.steps} steps)", ratio[name], "x", ("<=", TARGET))
                   for name in names]
        settings = {"global_batch": args.global_batch, "steps": args.steps, "warmup": args.warmup, "rounds": args.rounds,
                    "model": args.model, "zero_stage": args.zero_stage}
        write_json(args.json, make_result("ddp_scaling", figures, s_per_step={str(n): m for n, m in median.items()},
                                          ratio=ratio, rounds={str(n): t for n, t in times.items()}, settings=settings))
    print("ratio: " + " ".join(f"{name}={ratio[name]:.2f}" for name in names))


if __name__ == "__main__":
    main()
