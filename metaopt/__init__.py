"""metaopt: composable multi-task and meta-learning optimizers for PyTorch.

Every optimizer wraps a ``torch.optim.Optimizer`` and is itself one, driven the torch way::

    (task,) = opt.next_tasks()              # Sequential Reptile, Reptile
    loss_fn(model, task, next(batches[task])).backward()
    opt.step(); opt.zero_grad()

    losses = {t: loss_fn(model, t, next(batches[t])) for t in opt.next_tasks()}
    opt.backward(losses)                    # PCGrad, GradVac, GradNorm, MTL
    opt.step(); opt.zero_grad()

or by the one loop, ``report = opt.step(losses)``.

Flagship: :class:`SequentialReptile` (Lee et al., ICLR 2022).
"""

from . import aggregation, data, functional, interpolation, jacobian, maml, schedules
from .base import MultiTaskOptimizer
from .checkpoint import CheckpointError, load_checkpoint, save_checkpoint
from .diagnostics import GradientDiagnostics, gradient_diagnostics
from .distributed_checkpoint import load_distributed_checkpoint, save_distributed_checkpoint
from .gradnorm import GradNorm
from .gradvac import GradVac
from .interpolation import Interpolator, interpolate_, register_kernel
from .mtl import MTL
from .pcgrad import PCGrad
from .report import StepReport
from .reptile import Reptile
from .schedules import TaskSchedule
from .sequential_reptile import SequentialReptile
from .slow_fast import SlowFastOptimizer
from .surgery import GradientSurgery
from .weighted import Weighted

__version__ = "0.1.0"

__all__ = [
    "CheckpointError",
    "GradNorm",
    "GradVac",
    "GradientDiagnostics",
    "GradientSurgery",
    "Interpolator",
    "MTL",
    "PCGrad",
    "aggregation",
    "data",
    "gradient_diagnostics",
    "jacobian",
    "load_checkpoint",
    "load_distributed_checkpoint",
    "maml",
    "MultiTaskOptimizer",
    "Reptile",
    "SequentialReptile",
    "SlowFastOptimizer",
    "StepReport",
    "TaskSchedule",
    "Weighted",
    "functional",
    "interpolate_",
    "interpolation",
    "register_kernel",
    "save_checkpoint",
    "save_distributed_checkpoint",
    "schedules",
]
