"""Every code block of docs/recipes.md runs, in order, in one namespace (as a reader would run
them); the blocks that define a ``worker`` (DDP, local trajectories) are launched on 2 gloo
ranks with a deadline."""

from __future__ import annotations

import importlib.util
import re
import socket
import sys
from pathlib import Path

import pytest

from _spawn import run_and_leave, spawn

PAGE = Path(__file__).resolve().parent.parent / "docs" / "recipes.md"
BLOCKS = re.findall(r"```python\n(.*?)```", PAGE.read_text(), flags=re.S)


def _title(block: str) -> str:
    text = PAGE.read_text()
    before = text[: text.index(block)]
    return re.findall(r"^## (.+)$", before, flags=re.M)[-1]


def test_the_page_has_the_recipes_the_issue_names():
    titles = {_title(b) for b in BLOCKS}
    for needed in (
        "Gradient clipping",
        "Gradient accumulation",
        "fp16 with `GradScaler`",
        "bf16 autocast",
        "`torch.compile`",
        "DistributedDataParallel",
        "The Hugging Face `Trainer`",
        "Frozen parameters",
        "Local trajectories",
    ):
        assert needed in titles


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_every_recipe_runs(tmp_path):
    namespace: dict = {"__name__": "recipes"}
    setup = BLOCKS[0]
    for block in BLOCKS:
        title = _title(block)
        if title == "The Hugging Face `Trainer`":
            pytest.importorskip("transformers")
        if "def worker(rank, world_size, port)" in block:
            # spawned ranks import the worker from a module: the set-up and this block
            name = f"recipe_worker_{BLOCKS.index(block)}"
            module = tmp_path / f"{name}.py"
            module.write_text(setup + "\n" + block)
            sys.path.insert(0, str(tmp_path))
            try:
                spec = importlib.util.spec_from_file_location(name, module)
                ddp_recipe = importlib.util.module_from_spec(spec)
                sys.modules[name] = ddp_recipe
                spec.loader.exec_module(ddp_recipe)
                spawn(run_and_leave, 2, (name, "worker", 2, _free_port()), deadline_s=120)
            finally:
                sys.path.remove(str(tmp_path))
                sys.modules.pop(name, None)
            continue
        exec(compile(block, f"docs/recipes.md: {title}", "exec"), namespace)
