"""Branching Score ops give the same numbers with the batch axis sharded over 8 fake CPU devices (jit), for
meshes with explicit (the ``jax.make_mesh`` default) and auto axis types."""
import jax
import numpy as np
import pytest
from jax.sharding import AxisType, NamedSharding
from jax.sharding import PartitionSpec as P

from appo_jax.core.branching import branching_scores, future_values, select_branch_points, token_entropy
from appo_jax.core.candidates import candidate_mask

pytestmark = pytest.mark.skipif(jax.device_count() < 8, reason="needs 8 (fake) devices")

N, L, V, GROUPS, BUDGET = 16, 24, 40, 4, 5


def _inputs():
    rng = np.random.default_rng(0)
    logits = rng.standard_normal((N, L, V)).astype(np.float32) * 3
    log_ratio = (rng.standard_normal((N, L)) * 0.1).astype(np.float32)
    tokens = rng.integers(0, V, (N, L)).astype(np.int32)
    gen = rng.random((N, L)) < 0.8
    gen[3] = False  # an all-masked row
    table = rng.random(V) < 0.8
    group_ids = rng.permutation(np.repeat(np.arange(GROUPS), N // GROUPS)).astype(np.int32)
    group_ids[group_ids == 2] = -1  # group 2 is empty
    return logits, (log_ratio, tokens, gen, group_ids), table


@pytest.mark.parametrize("axis_type", [AxisType.Explicit, AxisType.Auto])
def test_sharded_equals_unsharded(axis_type):
    logits, args, table = _inputs()

    def scores_and_selection(entropy, log_ratio, tokens, gen, group_ids):
        cand = candidate_mask(tokens, gen, table, L)
        omega = future_values(log_ratio, gen, 0.99, 0.2)
        scores, strict = branching_scores(entropy, omega, cand)
        return cand, omega, scores, strict, select_branch_points(scores, strict, cand, group_ids, GROUPS, BUDGET)

    mesh = jax.make_mesh((8,), ("data",), axis_types=(axis_type,))
    shard = lambda a: jax.device_put(a, NamedSharding(mesh, P("data", *([None] * (np.ndim(a) - 1)))))
    entropy_fn = jax.jit(lambda x: token_entropy(x, 0.8))
    entropy = np.asarray(entropy_fn(logits))
    sharded_logits = shard(logits)
    assert sharded_logits.sharding.shard_shape(sharded_logits.shape) == (N // 8, L, V)
    # the reduction over V may be vectorised differently per layout: equal up to rounding
    np.testing.assert_allclose(np.asarray(entropy_fn(sharded_logits)), entropy, rtol=1e-5, atol=1e-6)

    fn = jax.jit(scores_and_selection)
    want = jax.tree_util.tree_leaves(fn(entropy, *args))
    got = jax.tree_util.tree_leaves(fn(shard(entropy), *[shard(a) for a in args]))
    for a, b in zip(got, want):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    valid = np.asarray(want[-1])
    assert valid[[0, 1, 3]].all() and not valid[2].any()
