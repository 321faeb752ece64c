"""Functional-parameter utilities."""

from __future__ import annotations

import pytest
import torch
from conftest import make_model
from hypothesis import given
from hypothesis import strategies as st

from metaopt import functional as F


def test_pack_parameters_makes_views_and_keeps_values():
    model = make_model(0)
    before = [p.detach().clone() for p in model.parameters()]
    (flat,) = F.pack_parameters(model.parameters())
    assert flat.buffer.numel() == sum(p.numel() for p in model.parameters())
    for p, b, view in zip(model.parameters(), before, flat.views(flat.buffer)):
        assert torch.equal(p, b)
        assert p.data_ptr() == view.data_ptr()
    assert flat.intact()
    assert F.is_packed(list(model.parameters())) is not None
    # packing again is a no-op
    (again,) = F.pack_parameters(model.parameters())
    assert again.buffer.data_ptr() == flat.buffer.data_ptr()


def test_training_through_flat_views_updates_the_buffer():
    model = make_model(0)
    (flat,) = F.pack_parameters(model.parameters())
    opt = torch.optim.Adam(model.parameters(), lr=0.1)
    x = torch.randn(8, 4, generator=torch.Generator().manual_seed(0))
    for _ in range(3):
        opt.zero_grad()
        model(x).pow(2).mean().backward()
        opt.step()
        assert torch.equal(flat.buffer, torch.cat([p.detach().reshape(-1) for p in model.parameters()]))


def test_pack_groups_by_dtype():
    a = torch.nn.Parameter(torch.randn(3))
    b = torch.nn.Parameter(torch.randn(2, dtype=torch.float64))
    c = torch.nn.Parameter(torch.randn(4))
    packs = F.pack_parameters([a, b, c, a])
    assert sorted(p.buffer.numel() for p in packs) == [2, 7]


def test_is_packed_needs_one_storage_covered_without_gaps():
    buf = torch.randn(10)
    assert F.is_packed([buf[:4], buf[4:]]) is not None
    assert F.is_packed([buf[:4], buf[5:]]) is None  # a gap
    assert F.is_packed([buf[:4]]) is None  # part of the storage
    assert F.is_packed([buf.view(2, 5)[:, :2]]) is None  # strided, leaves elements out
    assert F.is_packed([buf[:4], torch.randn(6)]) is None  # two storages
    assert F.is_packed([buf.view(2, 5).t()]) is not None  # strided, covers it all
    assert F.is_packed([buf, buf[2:5]]) is not None  # overlapping views


def test_packing_keeps_storage_sharing_and_strides():
    """Distinct parameters that share storage stay shared after packing (regression: packing
    copied each into its own slot, so tied parameters silently diverged)."""
    g = torch.Generator().manual_seed(3)
    base = torch.nn.Parameter(torch.randn(6, generator=g))
    alias = torch.nn.Parameter(torch.zeros(6))
    alias.data = base.data  # same storage, another Parameter
    window = torch.nn.Parameter(torch.zeros(3))
    window.data = base.data[2:5]  # overlaps both
    strided = torch.nn.Parameter(torch.randn(3, 2, generator=g).t())  # non-contiguous
    other = torch.nn.Parameter(torch.randn(4, generator=g))
    params = [other, base, strided, alias, window]
    before = [p.detach().clone() for p in params]
    (flat,) = F.pack_parameters(params)
    for p, b in zip(params, before):
        assert torch.equal(p, b)
        assert p.untyped_storage().data_ptr() == flat.buffer.untyped_storage().data_ptr()
    assert strided.stride() == (1, 2)
    assert flat.buffer.numel() == 4 + 6 + 6  # each shared element stored once
    with torch.no_grad():
        base.add_(1.0)
    assert torch.equal(alias, base) and torch.equal(window, base[2:5])
    assert flat.intact() and F.is_packed(params) is not None


@given(
    sizes=st.lists(st.lists(st.integers(1, 4), max_size=3).map(tuple), min_size=1, max_size=5),
    seed=st.integers(0, 999),
)
def test_vector_dict_round_trip(sizes, seed):
    g = torch.Generator().manual_seed(seed)
    params = {f"p{i}": torch.randn(s, generator=g) for i, s in enumerate(sizes)}
    vec = F.parameters_to_vector_dict(params)
    back = F.vector_to_parameters_dict(vec, params)
    assert list(back) == list(params)
    for k in params:
        assert torch.equal(back[k], params[k])


def test_vector_to_dict_checks_length():
    with pytest.raises(ValueError, match="5 elements"):
        F.vector_to_parameters_dict(torch.ones(4), {"a": torch.ones(5)})
    with pytest.raises(ValueError, match="empty"):
        F.parameters_to_vector_dict({})


def test_functional_forward_matches_module_and_is_differentiable():
    model = make_model(0)
    x = torch.randn(5, 4, generator=torch.Generator().manual_seed(1))
    params = F.clone_parameters(dict(model.named_parameters()), requires_grad=True)
    out = F.functional_forward(model, params, x)
    torch.testing.assert_close(out, model(x))
    grads = torch.autograd.grad(out.sum(), list(params.values()))
    assert all(g is not None for g in grads)
    shifted = {k: v + 1.0 for k, v in params.items()}
    assert not torch.allclose(F.functional_forward(model, shifted, x), out)


def test_clone_and_detach():
    p = {"w": torch.randn(3, requires_grad=True)}
    c = F.clone_parameters(p)
    d = F.detach_parameters(p)
    assert not c["w"].requires_grad and c["w"].data_ptr() != p["w"].data_ptr()
    assert not d["w"].requires_grad and d["w"].data_ptr() == p["w"].data_ptr()


def test_unique_tensors():
    a, b = torch.ones(1), torch.ones(1)
    assert F.unique_tensors([a, b, a]) == [a, b]
