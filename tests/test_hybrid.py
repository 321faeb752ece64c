"""Hybrid: FSDP2 (and FSDP1) within each replica of the model and local trajectories across the replicas,
on a 2 x 2 DeviceMesh of 4 gloo ranks (spawned with a deadline). Equal to one process running
one trajectory per replica per outer step (float64, 1e-9), as local trajectories on 2 unsharded
ranks are; the two ranks of a replica draw the same tasks, the replicas their own. A process
group that is not the replica dimension is refused when the optimizer is built."""

from __future__ import annotations

import os

import _hybrid_worker
import _local_worker as w
import pytest
import torch
from test_local_trajectories import single_process

from _spawn import file_store, spawn

pytestmark = pytest.mark.skipif(not torch.distributed.is_available(), reason="no torch.distributed")


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    out = str(tmp_path_factory.mktemp("hybrid"))
    spawn(_hybrid_worker.run, 4, (file_store(out), out))
    return [torch.load(os.path.join(out, f"rank{r}.pt"), weights_only=True) for r in range(4)]


@pytest.mark.parametrize("kind", ["equivalence", "diloco", "fsdp1"])
def test_fsdp_within_replicas_and_local_trajectories_across_them_equal_one_process(results, kind):
    """``fsdp1``: FSDP1 (``use_orig_params``) within each replica, the equivalence case."""
    ranks = [r[kind] for r in results]
    by_replica = {0: [r for r in ranks if r["replica"] == 0], 1: [r for r in ranks if r["replica"] == 1]}
    assert all(len(v) == 2 for v in by_replica.values())
    for members in by_replica.values():  # one trajectory per replica: its ranks draw together
        assert members[0]["tasks"] == members[1]["tasks"]
    assert by_replica[0][0]["tasks"] != by_replica[1][0]["tasks"]
    for r in ranks:
        assert r["outer"] == w.OUTER
        assert all(torch.equal(a, b) for a, b in zip(r["params"], ranks[0]["params"]))
    model, _ = single_process(
        2, [by_replica[0][0]["tasks"], by_replica[1][0]["tasks"]], "equivalence" if kind == "fsdp1" else kind
    )
    for a, b in zip(ranks[0]["params"], model.parameters()):
        torch.testing.assert_close(a, b.detach(), rtol=0.0, atol=1e-9)


def test_a_group_that_is_not_the_replica_dimension_is_refused(results):
    for res in results:
        refused = res["refusals"]
        assert "needs process_group=the replica dimension's group" in refused["no group"]
        assert "is not the replica dimension" in refused["whole world"]
        assert "is not the replica dimension" in refused["shard group"]
