"""The launcher's one line for failed workers (`dist.nproc`): the cause first, described as the
survivors would describe it, with the checkpoint to resume from."""

from __future__ import annotations

import json

from torch.distributed.elastic.multiprocessing.errors import ProcessFailure

from framework.dist.launch import describe_failure


def _failure(rank: int, exitcode: int, timestamp: int) -> ProcessFailure:
    failure = ProcessFailure(local_rank=rank, pid=1000 + rank, exitcode=exitcode, error_file="")
    failure.timestamp = timestamp
    return failure


def test_a_killed_worker_is_named_before_the_survivor_the_launcher_stopped(tmp_path):
    """Rank 1 SIGKILLed (the OOM killer), rank 0 then stopped by the launcher's SIGTERM, both seen in
    the same second: the line names rank 1 and says where the last checkpoint stands."""
    last = tmp_path / "checkpoints" / "last"
    last.mkdir(parents=True)
    (last / "meta.json").write_text(json.dumps({"step": 7}))
    line = describe_failure({0: _failure(0, -15, 100), 1: _failure(1, -9, 100)}, 2, tmp_path)
    assert line.startswith("another process of this 2-process run died (rank 1 was killed by SIGKILL)")
    assert f"the last checkpoint {last} (step 7) is intact" in line and "resume=true" in line


def test_without_a_checkpoint_or_a_signal_the_line_says_so(tmp_path):
    line = describe_failure({1: _failure(1, -9, 100)}, 2, tmp_path)
    assert "no checkpoint was written yet" in line
    assert describe_failure({0: _failure(0, 1, 100), 1: _failure(1, 1, 99)}, 2, tmp_path) == "process rank 1 exited with code 1"
