"""Distributed checkpoints with local trajectories on 2 gloo ranks: rank 0 writes every rank's
state with metaopt.save_checkpoint, every rank loads its own part, and the run continues bit
for bit. One rank is SIGKILLed mid-run: the survivor stops with a clear error within the process
group's timeout (no hang), and a restart of every rank from the last checkpoint ends exactly
where an uninterrupted run ends. Also: the refusals of load_distributed_checkpoint."""

from __future__ import annotations

import multiprocessing
import os
import time

import _dist_crash_worker as cw
import pytest
import torch

import metaopt

from _spawn import file_store, spawn

pytestmark = pytest.mark.skipif(not torch.distributed.is_available(), reason="no torch.distributed")

DEADLINE_S = 120


def launch(
    out: str,
    ckpt: str,
    kill_at: int | None = None,
    resume: bool = False,
    stall_at: int | None = None,
    verify: bool = True,
) -> list[int | None]:
    """Both ranks as plain spawned processes (so that one dying does not take the other down
    with it, as torch.multiprocessing's join would); killed past the deadline."""
    ctx = multiprocessing.get_context("spawn")
    store = file_store(out)
    procs = [
        ctx.Process(target=cw.run, args=(r, 2, store, out, ckpt, kill_at, resume, stall_at, verify))
        for r in range(2)
    ]
    for p in procs:
        p.start()
    deadline = time.monotonic() + DEADLINE_S
    try:
        for p in procs:
            p.join(max(0.0, deadline - time.monotonic()))
        assert not any(p.is_alive() for p in procs), f"the ranks did not finish within {DEADLINE_S} s"
    finally:
        for p in procs:
            if p.is_alive():
                p.kill()
    return [p.exitcode for p in procs]


def _parts(ckpt: str) -> list[dict]:
    """Every rank's part of a distributed checkpoint, through its manifest."""
    manifest = metaopt.load_checkpoint(ckpt)["metaopt_ranks"]
    assert manifest["world_size"] == len(manifest["parts"])
    return [metaopt.load_checkpoint(os.path.join(os.path.dirname(ckpt), p)) for p in manifest["parts"]]


def _files(directory, name: str) -> int:
    """The checkpoint's files: the manifest and the parts it names (no stray part left)."""
    return len([f for f in os.listdir(directory) if f == name or f.startswith(name + ".")])


def _params(out: str, rank: int) -> dict:
    return torch.load(os.path.join(out, f"rank{rank}.pt"), weights_only=True)


def test_sigkill_one_rank_then_restart_all_resumes_bit_exactly(tmp_path):
    whole, crash = tmp_path / "whole", tmp_path / "crash"
    whole.mkdir()
    crash.mkdir()
    assert launch(str(whole), str(whole / "run.ckpt")) == [0, 0]

    ckpt = str(crash / "run.ckpt")
    t0 = time.monotonic()
    codes = launch(str(crash), ckpt, kill_at=8)
    assert codes[1] == -9  # SIGKILL
    assert codes[0] == 1  # the survivor stopped with an error ...
    assert time.monotonic() - t0 < DEADLINE_S  # ... instead of hanging
    message = (crash / "error0.txt").read_text()
    assert "Another rank has probably died" in message and "checkpoint" in message, message
    assert not (crash / "rank0.pt").exists()

    saved = _parts(ckpt)
    assert len(saved) == 2 and saved[0]["step"] == 8
    assert launch(str(crash), ckpt, resume=True) == [0, 0]
    for rank in range(2):
        resumed, reference = _params(str(crash), rank), _params(str(whole), rank)
        assert resumed["start"] == 8
        assert all(torch.equal(a, b) for a, b in zip(resumed["params"], reference["params"]))


@pytest.mark.parametrize("verify", [True, False])
def test_a_stalled_rank_times_the_outer_step_out_with_a_clear_error(tmp_path, verify):
    """A rank that is alive but does not arrive: the others wait ``timeout`` seconds (the
    optimizer's option) at the outer step, then raise instead of hanging: at verify_ranks'
    comparison before anything moves, or else at the all-reduce itself."""
    t0 = time.monotonic()
    codes = launch(str(tmp_path), str(tmp_path / "x.ckpt"), stall_at=1, verify=verify)
    elapsed = time.monotonic() - t0
    assert codes == [1, 1], codes  # the late rank then finds the others gone: an error too
    message = (tmp_path / "error0.txt").read_text()
    if verify:
        assert (
            "SequentialReptile.step (before outer step 1, verify_ranks=True): a collective "
            "failed or timed out" in message
        ), message
        assert "nothing was updated. Restart every rank from the last checkpoint" in message
    else:
        assert "SequentialReptile: outer step 1: a collective failed or timed out" in message, message
        assert "state is now incomplete. Restart every rank from the last checkpoint" in message
    assert elapsed < 3 * cw.STALL_TIMEOUT_S + 30


def _single_rank_group(tmp_path):
    if not torch.distributed.is_initialized():
        torch.distributed.init_process_group(
            "gloo", init_method=f"file://{tmp_path}/pg", rank=0, world_size=1
        )


def test_load_refuses_other_world_sizes_and_plain_checkpoints(tmp_path):
    _single_rank_group(tmp_path)
    try:
        path = str(tmp_path / "one.ckpt")
        metaopt.save_distributed_checkpoint(path, {"step": 2, "w": torch.ones(2)})
        metaopt.save_distributed_checkpoint(path, {"step": 3, "w": torch.ones(2)})
        assert metaopt.load_distributed_checkpoint(path)["step"] == 3
        assert _files(tmp_path, "one.ckpt") == 2  # the manifest and this rank's one part
        (tmp_path / "one.ckpt.x.rank0").write_text("a file named like a part: not ours")
        metaopt.save_distributed_checkpoint(path, {"step": 4})
        assert (tmp_path / "one.ckpt.x.rank0").exists() and _files(tmp_path, "one.ckpt") == 3
        # a checkpoint of an earlier version: every rank's state in the one file
        metaopt.save_checkpoint(path, {"metaopt_ranks": {"world_size": 1, "ranks": [{"step": 5}]}})
        assert metaopt.load_distributed_checkpoint(path) == {"step": 5}
        metaopt.save_checkpoint(path, {"metaopt_ranks": {"world_size": 2, "ranks": [{}, {}]}})
        with pytest.raises(metaopt.CheckpointError, match="written by 2 ranks, this run has 1"):
            metaopt.load_distributed_checkpoint(path)
        metaopt.save_checkpoint(path, {"step": 3})
        with pytest.raises(metaopt.CheckpointError, match="not a distributed checkpoint"):
            metaopt.load_distributed_checkpoint(path)
        with pytest.raises(TypeError, match="mapping"):
            metaopt.save_distributed_checkpoint(path, [1, 2])
        with pytest.raises(TypeError):  # a value the weights-only loader refuses: nothing written
            metaopt.save_distributed_checkpoint(path, {"f": object()})
        assert metaopt.load_checkpoint(path) == {"step": 3}
    finally:
        torch.distributed.destroy_process_group()


def test_distributed_checkpoints_need_torch_distributed(tmp_path):
    with pytest.raises(RuntimeError, match="not initialized"):
        metaopt.save_distributed_checkpoint(str(tmp_path / "x"), {"step": 1})


def test_a_bad_state_on_one_rank_fails_the_save_on_every_rank(tmp_path):
    ckpt = str(tmp_path / "run.ckpt")
    spawn(cw.bad_state, 2, (2, file_store(str(tmp_path)), str(tmp_path), ckpt), deadline_s=DEADLINE_S)
    mine, other = ((tmp_path / f"error{r}.txt").read_text() for r in (1, 0))
    assert mine.startswith("TypeError: state must be a mapping"), mine
    assert other.startswith(
        "RuntimeError: save_distributed_checkpoint: the state of rank(s) [1] "
        "could not be prepared; nothing was written"
    ), other
    saved = _parts(ckpt)
    assert [s["step"] for s in saved] == [1, 1] and [s["rank"] for s in saved] == [0, 1]
    assert _files(tmp_path, "run.ckpt") == 3  # the failed save left no part behind
