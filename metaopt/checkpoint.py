"""Crash-safe checkpoints: every state dict of a run in one file, replaced atomically, checked
on load, and decoded without running code from the file.

A checkpoint is one file holding a ``dict`` with string keys: the model's, the optimizer's and
the LR scheduler's state dicts, the step, and any extra values. Keeping them in one file means
they can never come from two different moments of the run.

>>> import os, tempfile, torch, metaopt
>>> model = torch.nn.Linear(2, 1)
>>> opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
>>> with tempfile.TemporaryDirectory() as d:
...     path = os.path.join(d, "run.ckpt")
...     metaopt.save_checkpoint(path, {"model": model.state_dict(),
...                                    "optimizer": opt.state_dict(), "step": 10})
...     state = metaopt.load_checkpoint(path)
>>> state["step"], torch.equal(state["model"]["weight"], model.weight)
(10, True)

**Writing** (:func:`save_checkpoint`). The new checkpoint is written to a temporary file in the
same directory, flushed and ``fsync``-ed, then moved onto the path with :func:`os.replace`, and
finally the directory itself is ``fsync``-ed. The facts this rests on: POSIX specifies that
``rename()`` onto an existing name swaps the name over in one step, so every reader of the path
sees either the old file or the new one and never a missing or half-written one; the rename
must not be issued before the new file's data is on disk (otherwise a crash can leave the new
name pointing at a file whose blocks were never written: ext4's delayed allocation made such
empty files after a crash a well-known failure), which is why the temporary file is ``fsync``-ed
first; and the rename is itself only a change to the directory, which Linux's ``fsync(2)``
manual says is made durable only by an ``fsync`` of the directory. So at any moment of a crash
the path holds either the previous complete checkpoint or the new complete one, and the
previous one is untouched until the rename (for a machine crash, as opposed to a killed
process, this also takes a file system that applies a rename atomically on disk, as the
journaling ones such as ext4 and XFS do). Temporary files are named
``.<name>.metaopt-tmp.<host>.<pid>.<token>`` beside the checkpoint; :func:`load_checkpoint`
never looks at them, and the next :func:`save_checkpoint` removes those left by a dead
process of this host (a temporary file of a live writer is left alone).

**Reading** (:func:`load_checkpoint`). A 56-byte header precedes the payload (a
``torch.save`` stream): 12 bytes of magic ``b"\\x89metaopt\\r\\n\\x1a\\n"``, the format version
(uint32), the payload length (uint64) and the payload's SHA-256 (32 bytes), integers little
endian. A file that is too short for what its header promises is reported as *torn*, a payload
whose hash differs as a *checksum mismatch*, a file without the magic, or a path that is not a
regular file (a directory, FIFO, device or socket: refused by ``stat`` before it is opened, as
opening a FIFO would block), as *not a metaopt checkpoint*, and a version above
:data:`FORMAT_VERSION` as written by a *newer format version*; each :class:`CheckpointError`
names the file. The payload is decoded only by ``torch.load(..., weights_only=True)``, whose
unpickler builds tensors, numbers, strings and plain containers but refuses any other global,
so a crafted file cannot run code at load time (a checksum is no defence there: whoever
crafts a file can compute one).
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import inspect
import io
import os
import pickle
import re
import secrets
import socket
import stat
import struct
from collections.abc import Callable, Mapping
from typing import IO, Any, Literal

import torch

__all__ = ["FORMAT_VERSION", "CheckpointError", "load_checkpoint", "save_checkpoint"]

try:
    import fcntl
except ImportError:  # Windows
    fcntl = None  # type: ignore[assignment]

MAGIC = b"\x89metaopt\r\n\x1a\n"
"""First bytes of every checkpoint (a non-ASCII lead byte and CR LF, as PNG does, so that text
mode transfers and plain text files are told apart from checkpoints)."""

FORMAT_VERSION = 1
"""The newest checkpoint format this metaopt writes and reads."""

_HEADER = struct.Struct("<12sIQ32s")  # magic, version, payload length, SHA-256 of the payload
HEADER_SIZE = _HEADER.size  # 56 bytes

_TEMP_MARK = ".metaopt-tmp."
_MAX_NAME_IN_TEMP = 100  # keep temporary names under the usual 255-byte limit

Reason = Literal["torn", "checksum", "not_checkpoint", "version", "unsafe", "undecodable"]
MapLocation = None | str | torch.device | dict[str, str] | Callable[[Any, str], Any]


class CheckpointError(ValueError):
    """A file at a checkpoint path that cannot be loaded; the message names the file.

    Attributes:
        path: the file.
        reason: ``"torn"`` (shorter than its header promises: an interrupted copy, or a write
            that bypassed :func:`save_checkpoint`), ``"checksum"`` (the payload's SHA-256 differs:
            corrupted bytes), ``"not_checkpoint"`` (no metaopt magic: some other file; or
            not a regular file at all, such as a directory or a FIFO, which is not read),
            ``"version"`` (a format this metaopt does not read), ``"unsafe"`` (the payload needs
            more than the weights-only unpickler allows) or ``"undecodable"`` (the payload passed
            its checksum but is not a checkpoint's dict). ``"checksum"`` also covers bytes
            after the payload.
    """

    def __init__(self, path: str, reason: Reason, message: str) -> None:
        super().__init__(f"{path}: {message}")
        self.path = path
        self.reason: Reason = reason
        self.detail = message

    def __reduce__(self) -> tuple[Any, ...]:
        return (type(self), (self.path, self.reason, self.detail))


# ---------------------------------------------------------------------- public functions
def save_checkpoint(path: str | os.PathLike[str], state: Mapping[str, Any]) -> None:
    """Write ``state`` to ``path`` atomically: a crash at any moment leaves either the previous
    complete checkpoint or the new complete one there.

    ``state`` is a mapping with string keys, typically ``{"model": model.state_dict(),
    "optimizer": opt.state_dict(), "scheduler": sched.state_dict(), "step": step, "extras":
    {...}}``; its values may be anything the weights-only loader accepts (tensors, numbers,
    strings, ``None``, lists, tuples, dicts, dtypes, devices). It is checked before the disk is
    touched: a non-mapping, a non-string key, or a value that would not serialise or would not
    load back under ``weights_only=True`` raises :class:`TypeError` naming the key, and nothing is
    written. The ``state_dict()`` of every metaopt optimizer qualifies, and so do those of
    torch's LR schedulers (tested: StepLR, CosineAnnealingLR, OneCycleLR, ReduceLROnPlateau,
    SequentialLR).

    The write goes to a temporary file beside ``path``, is flushed and ``fsync``-ed, renamed onto
    ``path`` with :func:`os.replace`, and the directory is ``fsync``-ed (why that is crash-safe:
    docs/checkpoints.md). If any of that fails, the temporary file is removed and ``path`` is
    left as it was. ``path`` must be a regular file or not exist: a directory raises
    :class:`IsADirectoryError`, and a FIFO, socket or device (also through a symbolic link)
    raises :class:`ValueError`, since the rename would silently replace it by a file.

    Example:
        >>> import os, tempfile, torch, metaopt
        >>> with tempfile.TemporaryDirectory() as d:
        ...     path = os.path.join(d, "ckpt")
        ...     metaopt.save_checkpoint(path, {"step": 1, "w": torch.ones(2)})
        ...     metaopt.save_checkpoint(path, {"step": 2, "w": torch.zeros(2)})   # replaces it
        ...     print(metaopt.load_checkpoint(path)["step"], sorted(os.listdir(d)))
        2 ['ckpt']
    """
    target = _check_path(path, "save_checkpoint")
    _check_replaceable(target)
    directory = os.path.dirname(os.path.abspath(target))
    if not os.path.isdir(directory):
        raise FileNotFoundError(f"save_checkpoint: directory {directory} does not exist")
    payload = _encode(state)
    header = _HEADER.pack(MAGIC, FORMAT_VERSION, len(payload), hashlib.sha256(payload).digest())

    _remove_stale_temps(target)
    tmp = os.path.join(directory, _temp_name(target))
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_BINARY", 0), 0o666)
    try:
        try:
            _write_all(fd, header)
            _write_all(fd, payload)
            _fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, target)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    _fsync_directory(directory)


def load_checkpoint(path: str | os.PathLike[str], *, map_location: MapLocation = None) -> dict[str, Any]:
    """Read a checkpoint written by :func:`save_checkpoint` and return its ``dict``.

    The header is checked (magic, format version, length), then the payload's SHA-256, and only
    then is the payload decoded, with ``torch.load(..., weights_only=True)``: nothing in the file
    can run code. A file that fails any check raises :class:`CheckpointError` naming the file
    and what is wrong (``reason`` says which), and so does a path that is not a regular file (a
    directory, a FIFO, a device, a socket: ``"not_checkpoint"``, refused before it is opened
    for reading, which for a FIFO would block). A missing file raises
    :class:`FileNotFoundError`.

    Args:
        path: the checkpoint file. Temporary files beside it are never read.
        map_location: passed to :func:`torch.load` (e.g. ``"cpu"`` to load a GPU run's
            checkpoint on a machine without one): ``None``, a str or :class:`torch.device`, a
            dict from location tags to location tags (strings) or a callable ``(storage,
            location tag)``. It is checked before the file is read: another type raises
            :class:`TypeError`, and a location torch cannot restore to here (an unknown device,
            ``"cuda:7"`` on a machine with fewer GPUs) :class:`ValueError`. If placing the
            tensors fails although the payload itself decodes (a callable that raises, a dict
            or ``None`` sending them to an absent device), that is a :class:`ValueError`
            naming ``map_location`` too, not a :class:`CheckpointError`.

    Resume in this order: ``model.load_state_dict`` first, then the optimizer's, then the
    scheduler's (the optimizer's state refers to the model's parameters, and a scheduler's to
    the optimizer's ``param_groups``).

    Example:
        >>> import os, tempfile, torch, metaopt
        >>> with tempfile.TemporaryDirectory() as d:
        ...     path = os.path.join(d, "ckpt")
        ...     with open(path, "wb") as f:
        ...         _ = f.write(b"not a checkpoint")
        ...     try:
        ...         metaopt.load_checkpoint(path)
        ...     except metaopt.CheckpointError as e:
        ...         print(e.reason)
        not_checkpoint
    """
    target = _check_path(path, "load_checkpoint")
    _check_map_location(map_location)
    with open(_open_regular(target), "rb") as f:
        size = os.fstat(f.fileno()).st_size
        head = f.read(HEADER_SIZE)
        length = _check_header(target, head, size)
        payload = f.read(length)
    if len(payload) != length:  # the file shrank while it was read
        raise CheckpointError(target, "torn", f"torn: payload ends after {len(payload)} of {length} bytes")
    digest = head[HEADER_SIZE - 32 :]
    if hashlib.sha256(payload).digest() != digest:
        raise CheckpointError(
            target,
            "checksum",
            "checksum mismatch: the payload's SHA-256 differs from the one in the header "
            "(the file is corrupted)",
        )
    try:
        state = _decode(io.BytesIO(payload), map_location)
    except pickle.UnpicklingError as e:
        raise CheckpointError(
            target,
            "unsafe",
            f"refused: torch's weights-only unpickler rejects the payload ({_blocked(e)}). "
            "A checkpoint holds only tensors, numbers, strings and plain containers, and "
            "metaopt never runs code from a checkpoint to load anything else",
        ) from e
    except (MemoryError, torch.OutOfMemoryError):
        raise  # neither the file's fault nor map_location's
    except Exception as e:
        if _intact(payload):  # then placing the tensors failed, not decoding the file
            raise ValueError(
                f"load_checkpoint: map_location={map_location!r} failed while loading {target} "
                f"({type(e).__name__}: {e}); the file itself is intact (it decodes with "
                "map_location='meta' or 'cpu')"
            ) from e
        raise CheckpointError(
            target,
            "undecodable",
            f"the payload passed its checksum but torch.load could not decode it: {e}",
        ) from e
    if not isinstance(state, dict) or not all(isinstance(k, str) for k in state):
        raise CheckpointError(
            target,
            "undecodable",
            f"the payload is a {type(state).__name__}, not a dict with string keys",
        )
    return state


# ---------------------------------------------------------------------- encoding
def _decode(stream: IO[bytes], map_location: MapLocation) -> Any:
    """The one decoder of checkpoint payloads, for :func:`load_checkpoint` and for the check in
    :func:`save_checkpoint`: torch's weights-only unpickler, never the full one."""
    return torch.load(stream, map_location=map_location, weights_only=True)


def _check_map_location(map_location: object) -> None:
    """Refuse a ``map_location`` that :func:`torch.load` could not use, before any file is read.

    The accepted forms are torch's: ``None``; a str or :class:`torch.device`, which must be a
    location torch can restore storages to (checked by restoring an empty storage there with
    torch's own ``default_restore_location``, so e.g. ``"cuda:7"`` on a machine with fewer
    GPUs, or ``"cpu:0"``, which torch.load does not restore to, fail here even for a checkpoint
    without tensors); a dict from location tags to location tags, all strings (its targets are
    used only for tags present in the file, so they are not probed); or a callable taking
    ``(storage, location tag)``. A wrong type raises :class:`TypeError`, an unusable location
    :class:`ValueError`; both name ``map_location`` and the value.
    """
    where = "load_checkpoint: map_location"
    if map_location is None:
        return
    if isinstance(map_location, (str, torch.device)):
        try:  # torch.load restores to str(device) for a torch.device
            torch.serialization.default_restore_location(torch.UntypedStorage(0), str(map_location))
        except Exception as e:
            raise ValueError(
                f"{where}={map_location!r} is not a location torch.load can place tensors on "
                f"({type(e).__name__}: {e})"
            ) from e
        return
    if isinstance(map_location, dict):
        bad = [(k, v) for k, v in map_location.items() if not (isinstance(k, str) and isinstance(v, str))]
        if bad:
            raise TypeError(
                f"{where}={map_location!r}: a dict map_location maps location tags to location "
                f"tags, both strings (e.g. {{'cuda:1': 'cuda:0'}}); {bad[0]!r} is not"
            )
        return
    if callable(map_location):
        try:
            signature = inspect.signature(map_location)
        except (TypeError, ValueError):  # no signature to check (some builtins)
            return
        try:
            signature.bind(None, "cpu")
        except TypeError:
            raise TypeError(
                f"{where}={map_location!r}: a callable map_location is called with two "
                f"arguments (storage, location tag), but its signature is {signature}"
            ) from None
        return
    raise TypeError(
        f"{where} must be None, a str or torch.device, a dict of location tags or a callable "
        f"(storage, location tag); got {type(map_location).__name__} {map_location!r}"
    )


def _intact(payload: bytes) -> bool:
    """Whether ``payload`` decodes with its tensors on the meta device (or the CPU): used to
    tell a payload that cannot be decoded from a ``map_location`` that failed to place it."""
    try:
        _check_loadable(io.BytesIO(payload))
    except Exception:
        return False
    return True


def _blocked(error: pickle.UnpicklingError) -> str:
    """The line of torch's weights-only message that says what was refused."""
    lines = [ln.strip() for ln in str(error).splitlines() if ln.strip()]
    specific = [ln for ln in lines if "GLOBAL" in ln or ln.startswith(("Unsupported", "Trying to"))]
    line = (specific or lines or [type(error).__name__])[0]
    return line.split(" Please use", 1)[0]  # not torch's hint to allowlist what was refused


def _serialise(value: Any) -> io.BytesIO:
    buf = io.BytesIO()
    torch.save(value, buf)
    return buf


def _check_loadable(buf: io.BytesIO) -> None:
    """Decode ``buf`` as :func:`load_checkpoint` would; raise what the decoder raises.

    On the meta device first, which rebuilds the structure without copying tensor data; tensor
    types without meta kernels (quantized, nested) are decoded on the CPU instead."""
    buf.seek(0)
    try:
        _decode(buf, "meta")
    except pickle.UnpicklingError:
        raise
    except Exception:
        buf.seek(0)
        _decode(buf, "cpu")


def _problem(value: Any) -> str | None:
    """Why ``value`` cannot be a checkpoint value, or None if it can."""
    try:
        buf = _serialise(value)
    except Exception as e:  # torch.save raises what pickle raises: several types
        return f"cannot be serialised by torch.save ({type(e).__name__}: {e})"
    try:
        _check_loadable(buf)
    except pickle.UnpicklingError as e:
        return f"would not load under weights_only=True ({_blocked(e)})"
    except Exception as e:
        return f"would not load back ({type(e).__name__}: {e})"
    return None


def _encode(state: Mapping[str, Any]) -> memoryview:
    """Check ``state`` and return its ``torch.save`` bytes (raises before anything is written)."""
    if not isinstance(state, Mapping):
        raise TypeError(
            "save_checkpoint: state must be a mapping {name: state dict or value}, got "
            f"{type(state).__name__}"
        )
    bad = [k for k in state if not isinstance(k, str)]
    if bad:
        raise TypeError(f"save_checkpoint: state keys must be strings, got {bad!r}")
    plain = dict(state)
    try:
        buf = _serialise(plain)
        _check_loadable(buf)
    except Exception:
        # find the culprit(s) to name them (only on this error path: one key at a time)
        problems = {k: p for k, v in plain.items() if (p := _problem(v)) is not None}
        if not problems:
            raise
        listed = "; ".join(f"state[{k!r}] {p}" for k, p in problems.items())
        raise TypeError(
            f"save_checkpoint: {listed}. Checkpoint values must be tensors, numbers, strings, "
            "None, dtypes, devices and lists/tuples/dicts of these (state_dict() outputs are); "
            "nothing was written"
        ) from None
    return buf.getbuffer()


def _check_path(path: str | os.PathLike[str], where: str) -> str:
    if not isinstance(path, (str, os.PathLike)):
        raise TypeError(f"{where}: path must be a str or os.PathLike, got {type(path).__name__}")
    target = os.fspath(path)
    if not isinstance(target, str):
        raise TypeError(f"{where}: path must be a text path, got {target!r}")
    if not target:
        raise ValueError(f"{where}: path is empty")
    return target


def _check_header(path: str, head: bytes, size: int) -> int:
    """Validate the header against the file's size; return the payload length."""
    if len(head) < len(MAGIC):
        if MAGIC.startswith(head):
            raise CheckpointError(
                path, "torn", f"torn: the file is {size} bytes, shorter than the {HEADER_SIZE}-byte header"
            )
        raise CheckpointError(path, "not_checkpoint", _foreign(head))
    if head[: len(MAGIC)] != MAGIC:
        raise CheckpointError(path, "not_checkpoint", _foreign(head))
    if len(head) < HEADER_SIZE:
        raise CheckpointError(
            path, "torn", f"torn: the file is {size} bytes, shorter than the {HEADER_SIZE}-byte header"
        )
    _, version, length, _ = _HEADER.unpack(head)
    if version > FORMAT_VERSION:
        raise CheckpointError(
            path,
            "version",
            f"written in checkpoint format version {version}, newer than the newest this metaopt "
            f"reads ({FORMAT_VERSION}); upgrade metaopt to load it",
        )
    if version < 1:
        raise CheckpointError(path, "version", f"unknown checkpoint format version {version}")
    expected = HEADER_SIZE + length
    if size < expected:
        raise CheckpointError(
            path,
            "torn",
            f"torn or truncated: the header promises {length} payload bytes, the file holds "
            f"{size - HEADER_SIZE} (an interrupted copy, or a write that bypassed save_checkpoint)",
        )
    if size > expected:
        raise CheckpointError(
            path,
            "checksum",
            f"corrupted: {size - expected} unexpected bytes after the {length}-byte payload",
        )
    return int(length)


def _foreign(head: bytes) -> str:
    if head.startswith(b"PK\x03\x04"):
        kind = "it looks like a plain torch.save file (a zip archive)"
    elif head[:1] == b"\x80":
        kind = "it looks like a raw pickle"
    elif not head:
        kind = "it is empty"
    else:
        kind = f"it starts with {head[: len(MAGIC)]!r}"
    return f"not a metaopt checkpoint: no metaopt magic at the start ({kind}); nothing was decoded"


# ---------------------------------------------------------------------- the file system
_KINDS: tuple[tuple[Callable[[int], bool], str], ...] = (
    (stat.S_ISDIR, "a directory"),
    (stat.S_ISFIFO, "a FIFO (named pipe)"),
    (stat.S_ISCHR, "a character device"),
    (stat.S_ISBLK, "a block device"),
    (stat.S_ISSOCK, "a socket"),
)


def _file_kind(mode: int) -> str:
    """What a file that is not a regular one is, for error messages."""
    for test, kind in _KINDS:
        if test(mode):
            return kind
    return f"a special file ({stat.filemode(mode)})"


def _require_regular(target: str, mode: int) -> None:
    if not stat.S_ISREG(mode):
        raise CheckpointError(
            target,
            "not_checkpoint",
            f"not a metaopt checkpoint: it is {_file_kind(mode)}, not a regular file; it was not read",
        )


def _open_regular(target: str) -> int:
    """A descriptor of ``target`` open for reading; anything but a regular file (following
    symbolic links) raises :class:`CheckpointError` ``"not_checkpoint"`` without being read.

    Checked with ``stat`` before opening (opening a FIFO for reading blocks until a writer
    appears, and opening a device can have effects of its own), and again with ``fstat`` on the
    descriptor, which is opened non-blocking, in case the path was replaced in between."""
    _require_regular(target, os.stat(target).st_mode)
    nonblock = getattr(os, "O_NONBLOCK", 0)  # absent on Windows, which has no FIFOs at paths
    flags = os.O_RDONLY | getattr(os, "O_BINARY", 0) | getattr(os, "O_NOCTTY", 0) | nonblock
    fd = os.open(target, flags)
    try:
        _require_regular(target, os.fstat(fd).st_mode)
        if nonblock and fcntl is not None:
            fcntl.fcntl(fd, fcntl.F_SETFL, fcntl.fcntl(fd, fcntl.F_GETFL) & ~nonblock)
    except BaseException:
        os.close(fd)
        raise
    return fd


def _check_replaceable(target: str) -> None:
    """Refuse to save onto anything but a regular file (a symbolic link is followed for this
    check; a missing file is fine). ``rename`` would replace a FIFO, socket or device node as
    readily as a file, silently: a reader waiting on the FIFO would wait forever, and a
    device node (as root) would be gone."""
    try:
        mode = os.stat(target).st_mode
    except OSError:  # missing (or unreachable: the write reports that)
        return
    if stat.S_ISDIR(mode):
        raise IsADirectoryError(f"save_checkpoint: {target} is a directory")
    if not stat.S_ISREG(mode):
        link = " (through a symbolic link)" if os.path.islink(target) else ""
        raise ValueError(
            f"save_checkpoint: {target} is {_file_kind(mode)}, not a regular file{link}; a "
            "checkpoint replaces only a regular file, so nothing was written"
        )


def _write_all(fd: int, data: bytes | memoryview) -> None:
    """Write every byte of ``data`` to ``fd`` (``os.write`` may write less than asked)."""
    view = memoryview(data)
    while view:
        n = os.write(fd, view)
        view = view[n:]


def _fsync(fd: int) -> None:
    """Flush a file to stable storage. On macOS ``fsync`` only hands the data to the drive;
    ``F_FULLFSYNC`` asks the drive to flush its cache too, so it is used where it exists."""
    full = getattr(fcntl, "F_FULLFSYNC", None) if fcntl is not None else None
    if full is not None:
        try:
            fcntl.fcntl(fd, full)
            return
        except OSError:
            pass
    os.fsync(fd)


def _fsync_directory(directory: str) -> None:
    """Make the rename durable: ``fsync`` the directory that holds the entry (POSIX systems; a
    file system that cannot ``fsync`` a directory, EINVAL, is skipped). Windows has no directory
    handles to flush and is skipped."""
    if os.name != "posix":
        return
    fd = os.open(directory, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    try:
        os.fsync(fd)
    except OSError as e:
        if e.errno not in (errno.EINVAL, errno.ENOTSUP):
            raise
    finally:
        os.close(fd)


def _host() -> str:
    return re.sub(r"[^A-Za-z0-9-]", "-", socket.gethostname())[:64] or "host"


def _temp_prefix(target: str) -> str:
    return "." + os.path.basename(target)[:_MAX_NAME_IN_TEMP] + _TEMP_MARK


def _temp_name(target: str) -> str:
    return f"{_temp_prefix(target)}{_host()}.{os.getpid()}.{secrets.token_hex(8)}"


def _temp_files(target: str) -> list[str]:
    """Paths of the temporary files of ``target``'s writers present beside it, sorted."""
    directory = os.path.dirname(os.path.abspath(target))
    prefix = _temp_prefix(target)
    return sorted(os.path.join(directory, n) for n in os.listdir(directory) if n.startswith(prefix))


def _pid_alive(pid: int) -> bool:
    if os.name != "posix":
        return True  # no safe liveness probe (os.kill would terminate the process there)
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # exists, belongs to another user
    return True


def _remove_stale_temps(target: str) -> None:
    """Remove temporary files of ``target`` left by dead writers on this host. Files of live
    processes, of other hosts (a shared file system) and of this process are kept."""
    pattern = re.compile(
        re.escape(_temp_prefix(target)) + r"(?P<host>[A-Za-z0-9-]+)\.(?P<pid>\d+)\.[0-9a-f]+\Z"
    )
    host, own = _host(), os.getpid()
    for tmp in _temp_files(target):
        m = pattern.match(os.path.basename(tmp))
        if m is None or m["host"] != host:
            continue
        pid = int(m["pid"])
        if pid != own and not _pid_alive(pid):
            with contextlib.suppress(OSError):
                os.unlink(tmp)
