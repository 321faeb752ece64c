"""A small on-disk cache for one-time preparation (frozen-bottom states, the LID probe).

Each entry is a safetensors file of tensors plus a JSON manifest holding the entry's *key* (the
full configuration it was built from), a SHA-256 of the tensor file and free-form metadata. The
file name carries a digest of the key, so a changed configuration gets a new entry; on load the
key and the checksum are verified, and an entry that is corrupt, truncated or built for another
configuration is reported (one line on stderr) and rebuilt.

Location: ``--cache-dir``, else ``$METAOPT_CACHE_DIR``, else ``$XDG_CACHE_HOME/metaopt``, else
``~/.cache/metaopt``; entries live in its ``multilingual/`` subfolder.

Example::

    cache = DiskCache(default_cache_dir())
    tensors, meta = cache.load_or_build("probe", {"seed": 0}, lambda: ({"w": torch.zeros(2)}, {}))
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from torch import Tensor

FORMAT = 1
"""Bumped when the layout of entries changes; older entries then count as mismatched."""

Built = tuple[dict[str, Tensor], dict[str, Any]]


class CacheError(Exception):
    """An entry that cannot be used (the message says why)."""


def default_cache_dir() -> Path:
    """``$METAOPT_CACHE_DIR``, else ``$XDG_CACHE_HOME/metaopt``, else ``~/.cache/metaopt``."""
    if os.environ.get("METAOPT_CACHE_DIR"):
        return Path(os.environ["METAOPT_CACHE_DIR"])
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "metaopt"


def _digest(key: Mapping[str, Any]) -> str:
    text = json.dumps(key, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def file_sha256(path: Path) -> str:
    """The SHA-256 of a file's bytes, hex."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _log_stderr(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


class DiskCache:
    """Entries under ``root/multilingual``; ``log`` receives one line per rebuild or problem."""

    def __init__(self, root: Path, log: Callable[[str], None] = _log_stderr) -> None:
        self.dir = Path(root) / "multilingual"
        self.log = log

    def paths(self, name: str, key: Mapping[str, Any]) -> tuple[Path, Path]:
        """The (tensor file, manifest) paths of an entry."""
        stem = f"{name}-{_digest({'format': FORMAT, **key})}"
        return self.dir / f"{stem}.safetensors", self.dir / f"{stem}.json"

    def load(self, name: str, key: Mapping[str, Any]) -> Built | None:
        """The entry's tensors and metadata; ``None`` if absent. Raises :class:`CacheError`."""
        payload, manifest = self.paths(name, key)
        if not payload.exists() and not manifest.exists():
            return None
        if not payload.exists() or not manifest.exists():
            raise CacheError("incomplete (tensor file or manifest missing)")
        try:
            info = json.loads(manifest.read_text())
        except (OSError, ValueError) as exc:
            raise CacheError(f"corrupt (unreadable manifest: {exc})") from None
        if not isinstance(info, dict) or info.get("format") != FORMAT:
            raise CacheError("from another cache format")
        if info.get("key") != json.loads(json.dumps(dict(key), default=str)):
            raise CacheError("built for a different configuration")
        if info.get("sha256") != file_sha256(payload):
            raise CacheError("corrupt (checksum mismatch)")
        from safetensors.torch import load_file

        try:
            tensors = load_file(str(payload))
        except Exception as exc:  # safetensors raises several types on damaged files
            raise CacheError(f"corrupt (unreadable tensors: {exc})") from None
        return tensors, dict(info.get("meta", {}))

    def save(
        self, name: str, key: Mapping[str, Any], tensors: dict[str, Tensor], meta: Mapping[str, Any]
    ) -> None:
        """Write an entry atomically (temporary files, then rename)."""
        from safetensors.torch import save_file

        payload, manifest = self.paths(name, key)
        self.dir.mkdir(parents=True, exist_ok=True)
        tmp = payload.with_suffix(".tmp")
        save_file({k: v.detach().cpu().contiguous() for k, v in tensors.items()}, str(tmp))
        info = {
            "format": FORMAT,
            "name": name,
            "key": dict(key),
            "sha256": file_sha256(tmp),
            "meta": dict(meta),
        }
        tmp_manifest = manifest.with_suffix(".json.tmp")
        tmp_manifest.write_text(json.dumps(info, indent=1, default=str))
        os.replace(tmp, payload)
        os.replace(tmp_manifest, manifest)

    def load_or_build(self, name: str, key: Mapping[str, Any], build: Callable[[], Built]) -> Built:
        """The cached entry, or ``build()``'s result (then stored). A bad entry is reported
        and rebuilt; a cache folder that cannot be written is reported and skipped."""
        payload, _ = self.paths(name, key)
        try:
            found = self.load(name, key)
        except CacheError as exc:
            self.log(f"cache: entry {payload.name} is {exc}; rebuilding it")
            found = None
        if found is not None:
            return found
        tensors, meta = build()
        try:
            self.save(name, key, tensors, meta)
        except OSError as exc:
            self.log(f"cache: cannot write {payload} ({exc}); continuing without caching")
        return tensors, meta
