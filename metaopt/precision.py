"""The master precision of the slow weights: which dtype φ is kept in for a parameter's dtype,
and the master form of low-precision fast weights that the outer step interpolates toward.

Half-precision parameters (float16, bfloat16) keep a float32 master copy of φ. θ starts each
trajectory at φ rounded to θ's dtype, so the rounding error ``φ − round(φ)`` is not part of the
trajectory's displacement: the outer step uses θ's master form ``θ + (φ − round(φ))``.

>>> import torch
>>> master_dtype(torch.bfloat16), master_dtype(torch.float64)
(torch.float32, torch.float64)
>>> phi = [torch.tensor([1.001])]
>>> master_form([phi[0].to(torch.bfloat16)], phi)[0]   # θ = round(φ) has not moved: φ itself
tensor([1.0010])
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

__all__ = ["LOW_PRECISION", "master_dtype", "master_form"]

LOW_PRECISION = (torch.float16, torch.bfloat16)
"""The parameter dtypes whose slow weights are kept in float32."""


def master_dtype(dtype: torch.dtype) -> torch.dtype:
    """dtype of the slow copy kept for parameters of ``dtype``: float32 for half types."""
    return torch.float32 if dtype in LOW_PRECISION else dtype


def master_form(fast: Sequence[Tensor], slow: Sequence[Tensor]) -> list[Tensor]:
    """θ as a master copy would hold it: ``fast`` itself, or for low-precision θ (φ in a wider
    dtype), θ plus the rounding error φ − round(φ) that θ's trajectory started with."""
    if not slow or slow[0].dtype == fast[0].dtype:
        return list(fast)
    dtype = slow[0].dtype
    out = [f.to(dtype) for f in fast]
    torch._foreach_add_(out, torch._foreach_sub(list(slow), [v.to(fast[0].dtype).to(dtype) for v in slow]))
    return out
