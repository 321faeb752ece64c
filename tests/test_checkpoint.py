"""Checkpoints (metaopt.checkpoint): the file format checked against an independent parse, every
way a file can be wrong, atomic replacement under failures and SIGKILL, and weights-only loading
that refuses crafted pickles."""

from __future__ import annotations

import builtins
import hashlib
import io
import multiprocessing
import os
import pickle
import random
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path

import _crash_worker
import conftest
import pytest
import torch
from conftest import TASKS, make_data, make_model, task_loss

import metaopt
from metaopt import checkpoint as ckpt_module
from metaopt.checkpoint import HEADER_SIZE, _temp_files

ROOT = Path(__file__).resolve().parent.parent
WORKER = Path(__file__).resolve().parent / "_crash_worker.py"

# The format, written out here by hand (not taken from the module) so the tests check it.
MAGIC = b"\x89metaopt\r\n\x1a\n"


def parse_by_hand(raw: bytes) -> tuple[int, int, bytes, bytes]:
    """(version, payload length, sha256, payload) of a checkpoint file's bytes."""
    assert raw[:12] == MAGIC
    version = int.from_bytes(raw[12:16], "little")
    length = int.from_bytes(raw[16:24], "little")
    return version, length, raw[24:56], raw[56:]


def build_file(payload: bytes, *, version: int = 1, digest: bytes | None = None) -> bytes:
    digest = hashlib.sha256(payload).digest() if digest is None else digest
    return MAGIC + version.to_bytes(4, "little") + len(payload).to_bytes(8, "little") + digest + payload


def torch_bytes(obj) -> bytes:
    buf = io.BytesIO()
    torch.save(obj, buf)
    return buf.getvalue()


def assert_same(a, b, where="state"):
    """Recursive equality: tensors by dtype, shape and value (bit for bit); the rest by ==."""
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor), where
        assert a.dtype == b.dtype and a.shape == b.shape, where
        assert torch.equal(a, b), where
    elif isinstance(a, dict):
        assert isinstance(b, dict) and list(a) == list(b), where
        for k in a:
            assert_same(a[k], b[k], f"{where}[{k!r}]")
    elif isinstance(a, (list, tuple)):
        assert type(a) is type(b) and len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b)):
            assert_same(x, y, f"{where}[{i}]")
    else:
        assert a == b and type(a) is type(b), where


def sample_state():
    model = make_model(0)
    data = make_data()
    opt = metaopt.SequentialReptile(
        torch.optim.AdamW(model.parameters(), lr=1e-2), tasks=TASKS, inner_steps=3, outer_lr=0.5, seed=3
    )
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=10)
    for _ in range(4):
        opt.step({t: task_loss(model, data, t) for t in opt.next_tasks()})
        sched.step()
    g = torch.Generator().manual_seed(7)
    return {
        "model": model.state_dict(),
        "optimizer": opt.state_dict(),
        "scheduler": sched.state_dict(),
        "step": 4,
        "extras": {
            "note": "run 7",
            "loss": 0.25,
            "none": None,
            "flags": [True, False],
            "pair": (1, "a"),
            "dtype": torch.bfloat16,
            "half": torch.randn(5, generator=g).to(torch.bfloat16),
            "ints": torch.arange(6).reshape(2, 3),
            "view": torch.randn(4, 4, generator=g)[:, 1],
            "empty": torch.zeros(0, 3),
        },
    }


# ---------------------------------------------------------------------- format and round trip
def test_round_trip_and_the_format_parsed_by_hand(tmp_path):
    path = tmp_path / "run.ckpt"
    state = sample_state()
    metaopt.save_checkpoint(path, state)
    assert_same(metaopt.load_checkpoint(path), state)
    raw = path.read_bytes()
    version, length, digest, payload = parse_by_hand(raw)
    assert HEADER_SIZE == 56
    assert version == 1 and length == len(raw) - 56 == len(payload)
    assert digest == hashlib.sha256(payload).digest()
    assert_same(torch.load(io.BytesIO(payload), weights_only=True), state)
    assert sorted(os.listdir(tmp_path)) == ["run.ckpt"]  # no temporary file left
    # a str path and map_location work too
    out = metaopt.load_checkpoint(str(path), map_location="cpu")
    assert out["model"]["0.weight"].device.type == "cpu"


@pytest.mark.filterwarnings("ignore::UserWarning")  # quantized: deprecated; nested: prototype
def test_tensor_types_without_meta_kernels_round_trip(tmp_path):
    """save_checkpoint's loadability check decodes on the meta device; quantized and nested
    tensors have no meta kernels there and must not be refused for it."""
    g = torch.Generator().manual_seed(2)
    state = {
        "q": torch.quantize_per_tensor(torch.randn(4, generator=g), 0.1, 0, torch.qint8),
        "nested": torch.nested.nested_tensor([torch.ones(2), torch.arange(3.0)]),
        "sparse": torch.randn(3, 3, generator=g).relu().to_sparse(),
    }
    metaopt.save_checkpoint(tmp_path / "c", state)
    got = metaopt.load_checkpoint(tmp_path / "c")
    assert torch.equal(got["q"].int_repr(), state["q"].int_repr()) and got["q"].q_scale() == 0.1
    assert [t.tolist() for t in got["nested"].unbind()] == [[1.0, 1.0], [0.0, 1.0, 2.0]]
    assert torch.equal(got["sparse"].to_dense(), state["sparse"].to_dense())


def test_save_replaces_the_previous_checkpoint(tmp_path):
    path = tmp_path / "c"
    metaopt.save_checkpoint(path, {"step": 1, "w": torch.ones(3)})
    metaopt.save_checkpoint(path, {"step": 2, "w": torch.full((3,), 2.0)})
    got = metaopt.load_checkpoint(path)
    assert got["step"] == 2 and torch.equal(got["w"], torch.full((3,), 2.0))
    assert sorted(os.listdir(tmp_path)) == ["c"]


# ---------------------------------------------------------------------- damaged files
def expect(path, reason, *fragments):
    with pytest.raises(metaopt.CheckpointError) as info:
        metaopt.load_checkpoint(path)
    err = info.value
    assert err.reason == reason, str(err)
    assert str(path) in str(err) and err.path == str(path)
    for f in fragments:
        assert f in str(err), str(err)
    assert isinstance(err, ValueError)
    return err


@pytest.mark.parametrize("where", ["payload_start", "payload_middle", "payload_end", "digest"])
def test_a_corrupt_byte_is_a_checksum_mismatch_naming_the_file(tmp_path, where):
    path = tmp_path / "c"
    metaopt.save_checkpoint(path, {"w": torch.randn(100, generator=torch.Generator().manual_seed(0))})
    raw = bytearray(path.read_bytes())
    i = {
        "payload_start": 56,
        "payload_middle": (56 + len(raw)) // 2,
        "payload_end": len(raw) - 1,
        "digest": 30,
    }[where]
    raw[i] ^= 0x01
    path.write_bytes(bytes(raw))
    expect(path, "checksum", "checksum mismatch")


@pytest.mark.parametrize("keep", [0, 5, 12, 30, 56, 57, -1])
def test_a_truncated_file_is_torn(tmp_path, keep):
    path = tmp_path / "c"
    metaopt.save_checkpoint(path, {"w": torch.ones(50)})
    raw = path.read_bytes()
    path.write_bytes(raw[:keep])
    expect(path, "torn", "torn")


def test_trailing_bytes_are_corruption(tmp_path):
    path = tmp_path / "c"
    metaopt.save_checkpoint(path, {"w": torch.ones(5)})
    path.write_bytes(path.read_bytes() + b"\x00\x01")
    expect(path, "checksum", "2 unexpected bytes")


def test_wrong_magic_and_foreign_files(tmp_path):
    path = tmp_path / "c"
    metaopt.save_checkpoint(path, {"w": torch.ones(5)})
    raw = bytearray(path.read_bytes())
    raw[1] = ord("M")
    path.write_bytes(bytes(raw))
    expect(path, "not_checkpoint", "not a metaopt checkpoint")
    torch.save({"w": torch.ones(5)}, path)  # a plain torch.save file
    expect(path, "not_checkpoint", "not a metaopt checkpoint", "plain torch.save")
    path.write_text("hello, this is a text file with more than fifty-six characters in it\n")
    expect(path, "not_checkpoint", "not a metaopt checkpoint")


def test_future_and_unknown_format_versions(tmp_path):
    path = tmp_path / "c"
    payload = torch_bytes({"w": torch.ones(2)})
    path.write_bytes(build_file(payload, version=2))
    expect(path, "version", "newer", "version 2")
    path.write_bytes(build_file(payload, version=0))
    expect(path, "version", "unknown")
    path.write_bytes(build_file(payload, version=1))  # the same bytes with version 1 load
    assert torch.equal(metaopt.load_checkpoint(path)["w"], torch.ones(2))


def test_a_checksummed_payload_that_is_not_a_dict(tmp_path):
    path = tmp_path / "c"
    path.write_bytes(build_file(torch_bytes([1, 2, 3])))
    expect(path, "undecodable", "list")
    path.write_bytes(build_file(b"PK\x03\x04 a zip header, then garbage"))
    expect(path, "undecodable", "passed its checksum")
    path.write_bytes(build_file(b"garbage that is no pickle"))  # refused by the unpickler
    expect(path, "unsafe", "weights-only unpickler rejects")


def test_missing_file_and_bad_paths(tmp_path):
    with pytest.raises(FileNotFoundError):
        metaopt.load_checkpoint(tmp_path / "absent")
    with pytest.raises(TypeError, match="path must be"):
        metaopt.load_checkpoint(3)
    with pytest.raises(TypeError, match="path must be"):
        metaopt.save_checkpoint(3, {})
    with pytest.raises(IsADirectoryError, match="is a directory"):
        metaopt.save_checkpoint(tmp_path, {})
    with pytest.raises(FileNotFoundError, match="does not exist"):
        metaopt.save_checkpoint(tmp_path / "no" / "c", {})
    assert os.listdir(tmp_path) == []


def test_checkpoint_error_pickles():
    err = metaopt.CheckpointError("/x/c", "torn", "torn: short")
    back = pickle.loads(pickle.dumps(err))
    assert (str(back), back.path, back.reason) == ("/x/c: torn: short", "/x/c", "torn")


# ---------------------------------------------------------------------- bad input to save
class NotAllowed:
    """A picklable class the weights-only loader does not know."""

    def __init__(self) -> None:
        self.x = 1


@pytest.mark.parametrize(
    "state,kind,fragment",
    [
        ([("model", {})], TypeError, "must be a mapping"),
        (None, TypeError, "must be a mapping"),
        ({1: torch.ones(1)}, TypeError, "keys must be strings"),
        ({"ok": 1, ("a",): 2}, TypeError, "keys must be strings"),
        ({"ok": 1, "fn": lambda: 0}, TypeError, "state['fn'] cannot be serialised"),
        (
            {"ok": 1, "extras": {"obj": NotAllowed()}},
            TypeError,
            "state['extras'] would not load under weights_only",
        ),
    ],
)
def test_save_validates_state_before_touching_the_disk(tmp_path, state, kind, fragment):
    path = tmp_path / "c"
    metaopt.save_checkpoint(path, {"step": 1})
    before = path.read_bytes()
    with pytest.raises(kind) as info:
        metaopt.save_checkpoint(path, state)
    assert fragment in str(info.value)
    assert "'ok'" not in str(info.value)  # only the culprit is named
    assert path.read_bytes() == before and sorted(os.listdir(tmp_path)) == ["c"]


# ---------------------------------------------------------------------- failures mid-save
@pytest.mark.parametrize("stage", ["payload_write", "fsync", "replace", "interrupt"])
def test_a_failed_save_leaves_the_previous_checkpoint_intact(tmp_path, monkeypatch, stage):
    path = tmp_path / "c"
    old = {"step": 1, "w": torch.randn(1000, generator=torch.Generator().manual_seed(1))}
    metaopt.save_checkpoint(path, old)
    before = path.read_bytes()
    real_write = ckpt_module._write_all
    seen: list[str] = []

    def half_then_fail(fd, data):
        seen.extend(_temp_files(path))  # the temporary file exists while the payload is written
        if len(data) > HEADER_SIZE:
            real_write(fd, bytes(memoryview(data)[: len(data) // 2]))
            if stage == "interrupt":
                raise KeyboardInterrupt
            raise OSError(28, "No space left on device")
        real_write(fd, data)

    def fail(*a):
        raise OSError(5, "Input/output error")

    if stage in ("payload_write", "interrupt"):
        monkeypatch.setattr(ckpt_module, "_write_all", half_then_fail)
    elif stage == "fsync":
        monkeypatch.setattr(ckpt_module, "_fsync", fail)
    else:
        monkeypatch.setattr(os, "replace", fail)
    with pytest.raises(KeyboardInterrupt if stage == "interrupt" else OSError):
        metaopt.save_checkpoint(path, {"step": 2, "w": torch.zeros(1000)})
    monkeypatch.undo()
    if stage in ("payload_write", "interrupt"):
        assert len(seen) == 2 and seen[0].startswith(str(tmp_path / ".c.metaopt-tmp."))
    assert path.read_bytes() == before
    assert sorted(os.listdir(tmp_path)) == ["c"]  # the temporary file was removed
    assert_same(metaopt.load_checkpoint(path), old)


def dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait(timeout=60)
    return proc.pid


def test_leftover_temporary_files_are_ignored_and_stale_ones_cleaned(tmp_path):
    path = tmp_path / "c"
    host = ckpt_module._host()
    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        names = {
            "dead": f".c.metaopt-tmp.{host}.{dead_pid()}.00ff",
            "live": f".c.metaopt-tmp.{host}.{sleeper.pid}.00ff",
            "own": f".c.metaopt-tmp.{host}.{os.getpid()}.00ff",
            "other_host": f".c.metaopt-tmp.{host}x-elsewhere.{dead_pid()}.00ff",
            "other_ckpt": f".d.metaopt-tmp.{host}.{dead_pid()}.00ff",
        }
        # a leftover that holds a valid, newer-looking checkpoint must not be picked up either
        metaopt.save_checkpoint(tmp_path / "donor", {"step": 99})
        for n in names.values():
            (tmp_path / n).write_bytes((tmp_path / "donor").read_bytes())
        (tmp_path / "donor").unlink()
        with pytest.raises(FileNotFoundError):  # temporary files are never read as the checkpoint
            metaopt.load_checkpoint(path)
        metaopt.save_checkpoint(path, {"step": 1})
        assert metaopt.load_checkpoint(path)["step"] == 1
        left = sorted(os.listdir(tmp_path))
        assert names["dead"] not in left
        for k in ("live", "own", "other_host", "other_ckpt"):
            assert names[k] in left, k
        assert [os.path.basename(p) for p in _temp_files(path)] == sorted(
            names[k] for k in ("live", "own", "other_host")
        )
    finally:
        sleeper.kill()
        sleeper.wait(timeout=60)


# ---------------------------------------------------------------------- crafted pickles
class RunsCode:
    """Unpickling this object calls ``func(arg)``: what an attacker would put in a file."""

    def __init__(self, func, arg: str) -> None:
        self.func, self.arg = func, arg

    def __reduce__(self):
        return (self.func, (self.arg,))


def attack(kind: str, marker: Path) -> RunsCode:
    if kind == "os.system":
        return RunsCode(os.system, f": > {shlex.quote(str(marker))}")
    return RunsCode(builtins.exec, f"open({str(marker)!r}, 'w').close()")


@pytest.mark.parametrize("kind", ["os.system", "builtins.exec"])
@pytest.mark.parametrize("packing", ["checksummed_payload", "raw_pickle", "raw_torch_save"])
def test_a_crafted_pickle_never_runs(tmp_path, kind, packing, monkeypatch):
    marker = tmp_path / "pwned"
    evil = {"model": {}, "step": 0, "extras": attack(kind, marker)}
    payload = torch_bytes(evil)
    # positive control: the payload does run its command under a full unpickler
    torch.load(io.BytesIO(payload), weights_only=False)
    assert marker.exists()
    marker.unlink()
    path = tmp_path / "c"
    if packing == "checksummed_payload":  # an attacker can compute the checksum
        path.write_bytes(build_file(payload))
        reason = "unsafe"
    elif packing == "raw_pickle":
        path.write_bytes(pickle.dumps(evil))
        pickle.loads(path.read_bytes())  # control: it runs under pickle.loads
        assert marker.exists()
        marker.unlink()
        reason = "not_checkpoint"
    else:
        path.write_bytes(payload)
        reason = "not_checkpoint"
    # an environment that asks torch to skip weights-only loading changes nothing
    monkeypatch.setenv("TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD", "1")
    err = expect(path, reason)
    assert not marker.exists()
    if reason == "unsafe":
        assert "refused" in str(err) and "never runs code" in str(err)
        assert ("system" if kind == "os.system" else "exec") in str(err)


# ---------------------------------------------------------------------- every optimizer's state
OPTIMIZERS = {
    "SequentialReptile": lambda m: metaopt.SequentialReptile(
        torch.optim.AdamW(m.parameters(), lr=1e-2), tasks=TASKS, inner_steps=3, outer_lr=0.5, seed=1
    ),
    "Reptile": lambda m: metaopt.Reptile(
        torch.optim.Adam(m.parameters(), lr=1e-2), tasks=TASKS, inner_steps=3, outer_lr=0.5, seed=1
    ),
    "Reptile_batched": lambda m: metaopt.Reptile(
        torch.optim.Adam(m.parameters(), lr=1e-2),
        tasks=TASKS,
        inner_steps=2,
        outer_lr=0.5,
        tasks_per_outer_step=2,
        seed=1,
    ),
    "PCGrad": lambda m: metaopt.PCGrad(torch.optim.Adam(m.parameters(), lr=1e-2), tasks=TASKS, seed=1),
    "GradVac": lambda m: metaopt.GradVac(
        torch.optim.Adam(m.parameters(), lr=1e-2), tasks=TASKS, beta=0.5, seed=1
    ),
    "GradNorm_MTL": lambda m: metaopt.GradNorm(
        metaopt.MTL(torch.optim.Adam(m.parameters(), lr=1e-2), tasks=TASKS),
        layer=m[0].parameters(),
        alpha=1.5,
    ),
    "MTL": lambda m: metaopt.MTL(torch.optim.SGD(m.parameters(), lr=1e-2, momentum=0.9), tasks=TASKS),
    "SequentialReptile_GradVac": lambda m: metaopt.SequentialReptile(
        metaopt.GradVac(torch.optim.Adam(m.parameters(), lr=1e-2), tasks=TASKS, beta=0.5, seed=2),
        inner_steps=2,
        outer_lr=0.5,
        seed=1,
    ),
}


@pytest.mark.parametrize("name", list(OPTIMIZERS))
def test_every_optimizer_resumes_exactly_from_a_checkpoint(tmp_path, name):
    """Save mid-run (mid-trajectory for the Reptile family; batched Reptile mid-outer-step),
    resume a fresh copy model -> optimizer -> scheduler, and continue: bit-for-bit the same."""
    data = make_data()

    def setup():
        model = make_model(0)
        opt = OPTIMIZERS[name](model)
        sched = torch.optim.lr_scheduler.StepLR(opt, step_size=2, gamma=0.5)
        return model, opt, sched

    def steps(model, opt, sched, n):
        for _ in range(n):
            opt.step({t: task_loss(model, data, t) for t in opt.next_tasks()})
            sched.step()

    model, opt, sched = setup()
    steps(model, opt, sched, 3)
    state = {
        "model": model.state_dict(),
        "optimizer": opt.state_dict(),
        "scheduler": sched.state_dict(),
        "step": 3,
    }
    # the claim itself: the raw state dicts load under torch's weights-only unpickler
    torch.load(io.BytesIO(torch_bytes(state)), weights_only=True)
    if name == "Reptile_batched":
        assert "metaopt_acc" in state["optimizer"]["state"][0]  # mid outer step
    path = tmp_path / "c"
    metaopt.save_checkpoint(path, state)

    model2, opt2, sched2 = setup()
    loaded = metaopt.load_checkpoint(path)
    model2.load_state_dict(loaded["model"])
    opt2.load_state_dict(loaded["optimizer"])
    sched2.load_state_dict(loaded["scheduler"])
    steps(model, opt, sched, 4)
    steps(model2, opt2, sched2, 4)
    for p, q in zip(model.parameters(), model2.parameters()):
        assert torch.equal(p, q)
    assert_same(opt2.state_dict(), opt.state_dict())
    assert sched2.get_last_lr() == sched.get_last_lr()
    assert not torch.equal(next(make_model(0).parameters()), next(model.parameters()))


@pytest.mark.parametrize(
    "make",
    [
        lambda o: torch.optim.lr_scheduler.StepLR(o, step_size=2),
        lambda o: torch.optim.lr_scheduler.CosineAnnealingLR(o, T_max=10),
        lambda o: torch.optim.lr_scheduler.OneCycleLR(o, max_lr=0.1, total_steps=10),
        lambda o: torch.optim.lr_scheduler.ReduceLROnPlateau(o),
        lambda o: torch.optim.lr_scheduler.SequentialLR(
            o,
            [torch.optim.lr_scheduler.LinearLR(o), torch.optim.lr_scheduler.ExponentialLR(o, 0.9)],
            milestones=[2],
        ),
    ],
    ids=["StepLR", "CosineAnnealingLR", "OneCycleLR", "ReduceLROnPlateau", "SequentialLR"],
)
def test_torch_lr_scheduler_state_dicts_round_trip(tmp_path, make):
    model = make_model(0)
    opt = metaopt.SequentialReptile(
        torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9), tasks=TASKS, inner_steps=2, seed=0
    )
    sched = make(opt)
    data = make_data()
    for _ in range(3):
        opt.step({t: task_loss(model, data, t) for t in opt.next_tasks()})
        if isinstance(sched, torch.optim.lr_scheduler.ReduceLROnPlateau):
            sched.step(1.0)  # a plateau: its counters move
        else:
            sched.step()
    metaopt.save_checkpoint(tmp_path / "c", {"scheduler": sched.state_dict()})
    assert_same(metaopt.load_checkpoint(tmp_path / "c")["scheduler"], sched.state_dict())


# ---------------------------------------------------------------------- SIGKILL
def worker_args(tmp: Path, name: str, steps: int, pad_mb: float) -> list[str]:
    return [
        "--ckpt",
        str(tmp / f"{name}.ckpt"),
        "--out",
        str(tmp / f"{name}.out"),
        "--steps",
        str(steps),
        "--save-every",
        "1",
        "--pad-mb",
        str(pad_mb),
    ]


def receive(conn, deadline: float):
    """The next ``(kind, n)`` report of a life, or None once it has exited (never waits past
    the deadline)."""
    if not conn.poll(max(0.0, deadline - time.monotonic())):
        raise TimeoutError("the worker sent nothing in time")
    try:
        return conn.recv()
    except EOFError:
        return None


def kill_test(
    tmp: Path,
    monkeypatch,
    *,
    kills: int,
    steps: int,
    pad_mb: float,
    seed: int,
    budget_s: float,
    fresh_final: bool,
) -> dict:
    """An uninterrupted reference run (a fresh ``python tests/_crash_worker.py`` process, run
    concurrently) against a run SIGKILLed ``kills`` times and resumed from its checkpoint each
    time, then completed (by a fresh process if ``fresh_final``, else by one more forked life).

    The killed lives are forked from a forkserver that has imported torch and metaopt once (a
    fresh interpreter costs seconds of imports per life); each one is a separate process that
    starts from that pristine state and gets everything else from the checkpoint file. Each
    life is killed at a random moment: after a randomly chosen step (its checkpoint reported
    written) plus a random fraction of a step's duration, most of which is spent saving."""
    t0 = time.monotonic()
    deadline = t0 + budget_s
    # the forkserver inherits the environment (not sys.path) of this process when it starts:
    # PYTHONPATH makes it import this worktree's metaopt and the worker module
    monkeypatch.setenv(
        "PYTHONPATH", os.pathsep.join([str(ROOT), str(WORKER.parent), os.environ.get("PYTHONPATH", "")])
    )
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    env = dict(os.environ)
    rng = random.Random(seed)
    # kill after these steps: distinct and at least 2 apart, so every life makes progress
    targets = sorted(2 * s for s in rng.sample(range(1, (steps - 2) // 2), kills))
    path = tmp / "killed.ckpt"
    stats = {"kills": 0, "mid_write": 0, "resumes": 0, "forked": 0, "preloaded": 0}
    seen_temps: set[str] = set()
    ctx = multiprocessing.get_context("forkserver")
    ctx.set_forkserver_preload(["_crash_worker"])
    lives = []
    ref_err = open(tmp / "ref.stderr", "wb")
    ref = subprocess.Popen(
        [sys.executable, str(WORKER), *worker_args(tmp, "ref", steps, pad_mb)],
        cwd=ROOT,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=ref_err,
    )

    def start_life(expected_start: int):
        """Fork one life; return it and its connection once it reported its start."""
        conn, child_end = ctx.Pipe(duplex=False)
        life = ctx.Process(
            target=_crash_worker.life,
            args=(worker_args(tmp, "killed", steps, pad_mb), child_end),
            daemon=True,
        )
        life.start()
        lives.append(life)
        child_end.close()
        preloaded = receive(conn, deadline)
        assert preloaded is not None, f"life failed to start: {life.exitcode}"
        stats["forked"] += 1
        stats["preloaded"] += preloaded[1]
        assert Path(preloaded[2]).is_relative_to(ROOT), preloaded[2]  # this worktree's metaopt
        first = receive(conn, deadline)
        stats.setdefault("first_start_s", round(time.monotonic() - t0, 1))
        assert first is not None and first[0] == "start", f"life failed to start: {life.exitcode}"
        assert first[1] == expected_start  # it resumed from the newest durable checkpoint
        stats["resumes"] += first[1] > 0
        return life, conn, first[1]

    try:
        period = 0.02
        last_durable = 0
        for target in targets:
            life, conn, reported = start_life(last_durable)
            stamps = []
            while reported < target:
                msg = receive(conn, deadline)
                assert msg is not None, f"the life exited (code {life.exitcode}) before it was killed"
                stamps.append(time.monotonic())
                reported = msg[1]
            if len(stamps) >= 3:
                period = (stamps[-1] - stamps[0]) / (len(stamps) - 1)
            time.sleep(rng.uniform(0.0, period))
            life.kill()  # SIGKILL
            life.join(timeout=30)
            assert life.exitcode == -signal.SIGKILL, life.exitcode
            while (msg := receive(conn, deadline)) is not None:  # reports sent before the kill
                reported = msg[1]
            conn.close()
            stats["kills"] += 1
            new = set(_temp_files(path)) - seen_temps
            stats["mid_write"] += bool(new)
            seen_temps |= new
            # the path always holds a complete checkpoint: the last one reported written, or
            # the one after it if the kill came between its rename and its report
            saved = metaopt.load_checkpoint(path)["step"]
            assert reported <= saved <= reported + 1, (reported, saved)
            last_durable = saved
        stats["lives_s"] = round(time.monotonic() - t0, 1)
        if fresh_final:  # a fresh interpreter resumes and completes the run
            final = subprocess.run(
                [sys.executable, str(WORKER), *worker_args(tmp, "killed", steps, pad_mb), "--progress"],
                cwd=ROOT,
                env=env,
                capture_output=True,
                timeout=max(1.0, deadline - time.monotonic()),
            )
            assert final.returncode == 0, final.stderr.decode()[-3000:]
            assert final.stdout.decode().startswith(f"start {last_durable}\n")
            stats["resumes"] += last_durable > 0
        else:  # one more forked life resumes and completes it
            life, conn, _ = start_life(last_durable)
            while receive(conn, deadline) is not None:
                pass
            conn.close()
            life.join(timeout=max(1.0, deadline - time.monotonic()))
            assert life.exitcode == 0, life.exitcode
        stats["final_done_s"] = round(time.monotonic() - t0, 1)
        ref.wait(timeout=max(1.0, deadline - time.monotonic()))
        assert ref.returncode == 0, (tmp / "ref.stderr").read_text()[-3000:]
    finally:
        for p in lives:
            if p.is_alive():
                p.kill()
                p.join(timeout=30)
        if ref.poll() is None:
            ref.kill()
            ref.wait(timeout=30)
        ref_err.close()
    a = torch.load(tmp / "ref.out", weights_only=True)
    b = torch.load(tmp / "killed.out", weights_only=True)
    pairs = list(zip(a["params"] + a["slow"], b["params"] + b["slow"]))
    stats["bit_exact"] = len(pairs) > 0 and all(torch.equal(x, y) for x, y in pairs)
    initial = [p.detach() for p in _crash_worker.build(steps)[0].parameters()]
    stats["trained"] = not any(torch.equal(x, y) for x, y in zip(a["params"], initial))
    stats["left_over_temps"] = len(_temp_files(path))
    stats["final_resumed_from"] = b["resumed_from"]
    stats["wall_s"] = round(time.monotonic() - t0, 1)
    return stats


def check_kill_stats(stats: dict, kills: int) -> str:
    summary = (
        f"SIGKILL test: {stats['kills']} kills, {stats['mid_write']} mid-write (temp file "
        f"left behind), {stats['resumes']} resumes, bit-exact {stats['bit_exact']}, "
        f"{stats['wall_s']} s (first life started at {stats['first_start_s']} s, lives done at "
        f"{stats['lives_s']} s, final run done at {stats['final_done_s']} s)"
    )
    print(summary)
    assert stats["kills"] == kills, summary
    # the lives were forked from a forkserver holding the imports (else each pays seconds)
    assert stats["preloaded"] == stats["forked"] >= kills, summary
    assert stats["resumes"] == kills, summary  # every life after the first, and the final run
    assert stats["bit_exact"] and stats["trained"], summary
    assert stats["final_resumed_from"] > 0, summary
    assert stats["left_over_temps"] == 0, summary  # the last save removed the dead writers' files
    return summary


@pytest.mark.skipif(os.name != "posix", reason="SIGKILL and forkserver are POSIX")
def test_sigkill_at_random_moments_resumes_bit_exactly(tmp_path, monkeypatch):
    stats = kill_test(
        tmp_path, monkeypatch, kills=5, steps=60, pad_mb=2, seed=0, budget_s=120, fresh_final=False
    )
    check_kill_stats(stats, 5)


@pytest.mark.long
@pytest.mark.skipif(os.name != "posix", reason="SIGKILL and forkserver are POSIX")
def test_sigkill_long_profile(tmp_path, monkeypatch):
    assert conftest.LONG
    stats = kill_test(
        tmp_path, monkeypatch, kills=100, steps=600, pad_mb=4, seed=1, budget_s=1500, fresh_final=True
    )
    summary = check_kill_stats(stats, 100)
    assert stats["mid_write"] >= 1, summary
