"""What ``load_checkpoint`` and ``save_checkpoint`` do with paths that are not regular files
(FIFOs, directories, devices, sockets) and with bad ``map_location`` values.

A reader blocked on a FIFO cannot be interrupted from Python, so every load of a FIFO runs in a
daemon thread under a deadline, and a blocked one is released by opening the FIFO for writing:
a regression fails the test instead of hanging the run.
"""

from __future__ import annotations

import functools
import os
import socket
import stat
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch

import metaopt
import metaopt.checkpoint as ckpt_module

posix_only = pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="FIFOs, sockets and /dev are POSIX")
DEADLINE_S = 20.0


def call_with_deadline(fn: Callable[[], Any], fifo: Path) -> Any:
    """``fn()``'s result (or raise what it raised); fail the test if it is still running after
    DEADLINE_S, after releasing it by opening ``fifo`` for writing (a reader blocked in
    ``open`` wakes up, then reads end of file once the writer closes)."""
    outcome: dict[str, Any] = {}

    def run() -> None:
        try:
            outcome["value"] = fn()
        except BaseException as e:
            outcome["error"] = e

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    thread.join(DEADLINE_S)
    if thread.is_alive():
        give_up = time.monotonic() + DEADLINE_S
        while thread.is_alive() and time.monotonic() < give_up:
            try:  # fails with ENXIO until the reader is inside open()
                fd = os.open(fifo, os.O_WRONLY | os.O_NONBLOCK)
            except OSError:
                time.sleep(0.05)
                continue
            os.close(fd)
            thread.join(1.0)
        pytest.fail(f"blocked for more than {DEADLINE_S} s on the FIFO {fifo} (released)")
    if "error" in outcome:
        raise outcome["error"]
    return outcome["value"]


def refused(path: Path | str, *fragments: str) -> metaopt.CheckpointError:
    with pytest.raises(metaopt.CheckpointError) as info:
        metaopt.load_checkpoint(path)
    err = info.value
    assert err.reason == "not_checkpoint", str(err)
    assert err.path == str(path) and str(err).startswith(f"{path}: ")
    for f in ("not a regular file", *fragments):
        assert f in str(err), str(err)
    assert isinstance(err, ValueError)
    return err


@pytest.fixture
def unix_socket(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    """A bound Unix socket at tmp_path/"s" (bound by a relative name: a socket path must be
    shorter than about 100 bytes, tmp_path may not be)."""
    monkeypatch.chdir(tmp_path)
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.bind("s")
        yield tmp_path / "s"


# ---------------------------------------------------------------------- loading special files
@posix_only
@pytest.mark.parametrize("via_link", [False, True])
def test_load_refuses_a_fifo_without_blocking(tmp_path, via_link):
    fifo = tmp_path / "pipe"
    os.mkfifo(fifo)
    path = fifo
    if via_link:
        path = tmp_path / "link"
        path.symlink_to(fifo)
    with pytest.raises(metaopt.CheckpointError) as info:
        call_with_deadline(lambda: metaopt.load_checkpoint(path), fifo)
    assert info.value.reason == "not_checkpoint"
    assert str(err := info.value).startswith(f"{path}: ") and "FIFO (named pipe)" in str(err), str(err)


@posix_only
def test_load_refuses_a_fifo_swapped_in_after_the_check(tmp_path, monkeypatch):
    """A FIFO that replaces a regular file between the check and the open (simulated: the
    check is shown a regular file's status) is still refused, and the open does not block."""
    fifo, regular = tmp_path / "pipe", tmp_path / "regular"
    os.mkfifo(fifo)
    metaopt.save_checkpoint(regular, {"step": 1})
    real_stat = os.stat

    def stale_stat(p: Any, *args: Any, **kwargs: Any) -> os.stat_result:
        return real_stat(regular if os.fspath(p) == str(fifo) else p, *args, **kwargs)

    monkeypatch.setattr(os, "stat", stale_stat)
    with pytest.raises(metaopt.CheckpointError) as info:
        call_with_deadline(lambda: metaopt.load_checkpoint(fifo), fifo)
    assert info.value.reason == "not_checkpoint" and "FIFO" in str(info.value), str(info.value)


def test_load_refuses_a_directory(tmp_path):
    refused(tmp_path, "a directory")


@posix_only
@pytest.mark.parametrize("device", ["/dev/null", "/dev/zero"])
def test_load_refuses_a_character_device(device):
    if not os.path.exists(device):
        pytest.skip(f"no {device}")
    refused(device, "a character device")


@posix_only
def test_load_refuses_a_socket(unix_socket):
    refused(unix_socket, "a socket")


def test_load_still_follows_a_link_to_a_checkpoint(tmp_path):
    metaopt.save_checkpoint(tmp_path / "c", {"step": 3})
    (tmp_path / "link").symlink_to(tmp_path / "c")
    assert metaopt.load_checkpoint(tmp_path / "link") == {"step": 3}


# ---------------------------------------------------------------------- saving onto special files
@posix_only
@pytest.mark.parametrize("via_link", [False, True])
def test_save_refuses_to_replace_a_fifo(tmp_path, via_link):
    fifo = tmp_path / "pipe"
    os.mkfifo(fifo)
    path = tmp_path / "link" if via_link else fifo
    if via_link:
        path.symlink_to(fifo)
    with pytest.raises(ValueError, match=r"is a FIFO \(named pipe\), not a regular file") as info:
        metaopt.save_checkpoint(path, {"step": 1})
    assert str(path) in str(info.value) and "nothing was written" in str(info.value)
    assert stat.S_ISFIFO(os.lstat(fifo).st_mode)  # still the FIFO, not replaced by a file
    assert sorted(os.listdir(tmp_path)) == sorted(["pipe"] + (["link"] if via_link else []))


@posix_only
def test_save_refuses_to_replace_a_socket_or_a_device(tmp_path, unix_socket):
    with pytest.raises(ValueError, match="is a socket, not a regular file"):
        metaopt.save_checkpoint(unix_socket, {"step": 1})
    assert stat.S_ISSOCK(os.lstat(unix_socket).st_mode)
    if os.path.exists("/dev/null"):  # through a link: never aim a test at /dev/null itself
        (tmp_path / "null").symlink_to("/dev/null")
        with pytest.raises(ValueError, match="is a character device"):
            metaopt.save_checkpoint(tmp_path / "null", {"step": 1})
        assert os.path.islink(tmp_path / "null")
    assert sorted(os.listdir(tmp_path)) == sorted(["s"] + (["null"] if os.path.exists("/dev/null") else []))


def test_save_through_a_link_to_a_directory_is_refused(tmp_path):
    (tmp_path / "d").mkdir()
    (tmp_path / "link").symlink_to(tmp_path / "d")
    with pytest.raises(IsADirectoryError, match="is a directory"):
        metaopt.save_checkpoint(tmp_path / "link", {"step": 1})
    assert os.path.islink(tmp_path / "link") and os.listdir(tmp_path / "d") == []


# ---------------------------------------------------------------------- map_location
@pytest.fixture
def checkpoint(tmp_path: Path) -> Path:
    path = tmp_path / "c"
    metaopt.save_checkpoint(
        path, {"w": torch.randn(3, generator=torch.Generator().manual_seed(0)), "step": 1}
    )
    return path


class ToMeta:
    def __call__(self, storage: Any, location: str) -> Any:
        return torch.UntypedStorage(storage.nbytes(), device="meta")


def keep(storage: Any, location: str) -> Any:
    return storage


@pytest.mark.parametrize(
    ("map_location", "device"),
    [
        (None, "cpu"),
        ("cpu", "cpu"),
        (torch.device("cpu"), "cpu"),
        ("meta", "meta"),
        (torch.device("meta"), "meta"),
        ({}, "cpu"),
        ({"cpu": "meta"}, "meta"),
        ({"cuda:0": "cpu", "cuda:7": "cpu"}, "cpu"),  # targets of absent tags are never used
        (keep, "cpu"),
        (lambda storage, location: None, "cpu"),  # None: torch's default placement
        (ToMeta(), "meta"),
        (functools.partial(lambda tag, storage, location: storage, "x"), "cpu"),
        (print, "cpu"),  # a builtin without a signature; print(storage, tag) returns None
    ],
    ids=repr,
)
def test_valid_map_locations_load(checkpoint, map_location, device, capsys):
    state = metaopt.load_checkpoint(checkpoint, map_location=map_location)
    assert state["step"] == 1 and state["w"].device == torch.device(device)
    if device == "cpu":
        assert torch.equal(state["w"], torch.randn(3, generator=torch.Generator().manual_seed(0)))


@pytest.mark.parametrize(
    ("map_location", "fragment"),
    [
        (42, "got int"),
        (1.5, "got float"),
        (b"cpu", "got bytes"),
        (["cpu"], "got list"),
        ({"cpu": torch.device("meta")}, "strings"),
        ({torch.device("cpu"): "meta"}, "strings"),
        (lambda storage: storage, "two arguments"),
    ],
    ids=repr,
)
def test_a_map_location_of_the_wrong_type_is_a_type_error(checkpoint, map_location, fragment):
    with pytest.raises(TypeError, match="map_location") as info:
        metaopt.load_checkpoint(checkpoint, map_location=map_location)
    assert not isinstance(info.value, metaopt.CheckpointError)
    assert fragment in str(info.value), str(info.value)
    assert repr(map_location) in str(info.value), str(info.value)


def absent_device() -> list[Any]:
    cases: list[Any] = ["nonsense_device", "cpu:0", "ipu"]
    if torch.cuda.device_count() < 8:
        cases += ["cuda:7", torch.device("cuda", 7)]
    if not torch.cuda.is_available():
        cases += ["cuda"]
    return cases


@pytest.mark.parametrize("map_location", absent_device(), ids=repr)
@pytest.mark.parametrize("with_tensors", [True, False])
def test_an_unusable_map_location_is_a_value_error_naming_it(tmp_path, map_location, with_tensors):
    """Refused before the file is read: also when the checkpoint holds no tensor (where
    torch.load would never use it), and when the file is not a checkpoint at all."""
    path = tmp_path / "c"
    metaopt.save_checkpoint(path, {"w": torch.ones(2)} if with_tensors else {"step": 1})
    for p in (path, tmp_path / "absent"):
        with pytest.raises(ValueError, match="map_location") as info:
            metaopt.load_checkpoint(p, map_location=map_location)
        err = info.value
        assert not isinstance(err, metaopt.CheckpointError), str(err)
        assert repr(map_location) in str(err) and str(p) not in str(err), str(err)


def test_a_failing_map_location_is_blamed_not_the_file(checkpoint):
    def broken(storage: Any, location: str) -> Any:
        raise RuntimeError("no such accelerator here")

    for map_location, fragment in [
        (broken, "no such accelerator here"),
        ({"cpu": "nonsense_device"}, "nonsense_device"),
    ]:
        with pytest.raises(ValueError, match="map_location") as info:
            metaopt.load_checkpoint(checkpoint, map_location=map_location)
        err = info.value
        assert not isinstance(err, metaopt.CheckpointError), str(err)
        assert fragment in str(err) and "the file itself is intact" in str(err), str(err)
        assert str(checkpoint) in str(err)  # the file is named, as the one being loaded


def test_a_damaged_file_is_still_blamed_with_a_valid_map_location(checkpoint):
    raw = bytearray(checkpoint.read_bytes())
    raw[-1] ^= 0xFF
    checkpoint.write_bytes(bytes(raw))
    with pytest.raises(metaopt.CheckpointError) as info:
        metaopt.load_checkpoint(checkpoint, map_location="cpu")
    assert info.value.reason == "checksum"


def test_running_out_of_memory_while_decoding_is_not_blamed_on_the_file(checkpoint, monkeypatch):
    def no_memory(*args: Any, **kwargs: Any) -> Any:
        raise MemoryError("simulated")

    monkeypatch.setattr(ckpt_module.torch, "load", no_memory)
    with pytest.raises(MemoryError, match="simulated"):
        metaopt.load_checkpoint(checkpoint, map_location="cpu")
