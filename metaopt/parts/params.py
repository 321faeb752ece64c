"""The wrapped optimizer's parameters, as an optimizer of metaopt follows them.

Each parameter once (a tied weight listed twice counts once), in the order of the wrapped
optimizer's param groups; frozen ones (``requires_grad=False``) are kept and skipped at each
step, as ``torch.optim`` skips them. Groups added later (``add_param_group``, on the metaopt
optimizer or on the wrapped one directly) are picked up by :meth:`ParamSet.sync`; removing or
reordering parameters is refused.

>>> import torch
>>> a, b = torch.nn.Parameter(torch.ones(2)), torch.nn.Parameter(torch.ones(3))
>>> sgd = torch.optim.SGD([a], lr=0.1)
>>> params = ParamSet(sgd, "X")
>>> sgd.add_param_group({"params": [b]})
>>> [tuple(p.shape) for p in params.sync()], params.name(b)
([(3,)], "param_groups[1]['params'][0] (shape (3,))")
"""

from __future__ import annotations

import sys

from torch import Tensor
from torch.optim import Optimizer

__all__ = ["ParamSet", "deepspeed_zero"]


def deepspeed_zero() -> str:
    """Why an optimizer's parameters were replaced, where DeepSpeed is loaded (else ``""``):
    its ZeRO stages 1 to 3 replace the parameters of the optimizer handed to
    ``deepspeed.initialize`` with flattened fp32 partitions."""
    if "deepspeed" not in sys.modules:
        return ""
    return (
        " (DeepSpeed's ZeRO stages 1-3 do this to the optimizer handed to deepspeed.initialize: "
        "they replace its parameters with flattened fp32 partitions, which metaopt's state, kept "
        "beside the model's own parameters, cannot follow; use ZeRO stage 0, which metaopt "
        "supports, or FSDP2 (torch.distributed.fsdp.fully_shard) to shard)"
    )


class ParamSet:
    """The parameters of ``optimizer`` (a ``torch.optim.Optimizer``); ``where`` names the
    metaopt optimizer in errors."""

    def __init__(self, optimizer: Optimizer, where: str) -> None:
        self.optimizer = optimizer
        self.where = where
        self.params: list[Tensor] = self._collect()  # validated now: a clear error

    def _collect(self) -> list[Tensor]:
        params: list[Tensor] = []
        seen: set[int] = set()
        for group in self.optimizer.param_groups:
            for p in group["params"]:
                if id(p) not in seen:
                    seen.add(id(p))
                    params.append(p)
        if not params:
            raise ValueError(f"{self.where}: the wrapped optimizer has no parameters{deepspeed_zero()}")
        return params

    def trainable(self) -> list[Tensor]:
        """The parameters that take part in this step (``requires_grad`` now)."""
        return [p for p in self.params if p.requires_grad]

    def sync(self) -> list[Tensor]:
        """Pick up parameters added to the optimizer since the last look; returns them."""
        known = self.params
        now = [p for g in self.optimizer.param_groups for p in g["params"]]
        if len(now) == len(known) and all(a is b for a, b in zip(now, known)):
            return []
        current = self._collect()
        if len(current) < len(known) or any(a is not b for a, b in zip(known, current)):
            raise ValueError(
                f"{self.where}: parameters were removed from (or reordered in) the wrapped "
                "optimizer after wrapping; only adding param groups is supported "
                f"(opt.add_param_group){deepspeed_zero()}"
            )
        self.params = current
        return current[len(known) :]

    def name(self, p: Tensor) -> str:
        """Where ``p`` sits in the param groups, for errors."""
        for gi, group in enumerate(self.optimizer.param_groups):
            for pi, q in enumerate(group["params"]):
                if q is p:
                    return f"param_groups[{gi}]['params'][{pi}] (shape {tuple(p.shape)})"
        return f"a parameter of shape {tuple(p.shape)}"
