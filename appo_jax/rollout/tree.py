"""Tree-GRPO step-level tree expansion (docs/algorithm.md §1.7): trees of ReAct steps with random node expansion.

A *step* is a segment of a rollout ending in a tool call (followed by its result) or the answer; a *node* is the
state after a complete tool step, i.e. response position ``t`` = the last observation token of a tool result
(expanding node t continues from ``prompt + response[: t + 1]``). Per prompt group there are ``n_init`` trees,
each rooted at one initial rollout; tree ``i`` receives ``E_i`` expansions, ``sum_i (1 + E_i) = n``
(:func:`expansion_counts`), spread over ``rounds`` rounds; in each round every tree expands nodes drawn
uniformly at random (without replacement while it has enough distinct nodes) from the nodes of all its rows so
far (a row that is itself an expansion at ``branch_pos = b`` adds only its nodes ``t > b``; the shared prefix
nodes belong to its parent). A tree without any node (no tool call yet) expands from its root: the expansion
restarts from the prompt (``t = -1``, an independent re-sample inside the tree).

Each round is one call of the engine's primitive (:func:`tree_rollouts`; the nodes of a round are drawn from the
rows gathered so far, the same draws on every process of a multi-host job); the strategy ``tree``
(:class:`TreeSearch`, options :class:`TreeOptions`: ``n``, ``n_init`` and the ``algorithm`` section's
``tree_rounds``) is registered here.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Sequence

import jax
import numpy as np

from appo_jax.core.trajectory import KIND_BRANCH
from appo_jax.data.records import Record
from appo_jax.rollout.engine import RolloutBatch, RolloutEngine, overlay_batches
from appo_jax.rollout.strategies import STRATEGIES, EveryRowTrains, attach_fork, check_budget, fork_source


def expansion_counts(n: int, n_init: int) -> list[int]:
    """``E_i`` for the ``n_init`` trees of a group: ``n - n_init`` expansions spread evenly, earlier trees first."""
    if not 1 <= n_init <= n:
        raise ValueError(f"Tree-GRPO needs 1 <= n_init <= n, got n_init={n_init}, n={n}")
    extra = n - n_init
    return [extra // n_init + (1 if i < extra % n_init else 0) for i in range(n_init)]


def step_nodes(obs_mask: np.ndarray, max_response_len: int, after: int = -1) -> list[int]:
    """Node positions of one rollout: every ``t`` where an observation run ends (``obs[t]`` and not
    ``obs[t + 1]``), with ``t > after`` and room to continue (``t + 1 < max_response_len``)."""
    obs = np.asarray(obs_mask, bool)
    nxt = np.concatenate([obs[1:], [False]])
    ends = np.flatnonzero(obs & ~nxt)
    return [int(t) for t in ends if after < t and t + 1 < max_response_len]


def choose_nodes(nodes: list[tuple[int, int]], k: int, rng: np.random.Generator) -> list[tuple[int, int]]:
    """``k`` nodes ``(row, t)`` drawn uniformly from ``nodes`` (without replacement while ``len(nodes) >= k``,
    else every node once and the rest with replacement)."""
    if k <= 0 or not nodes:
        return []
    if len(nodes) >= k:
        idx = rng.choice(len(nodes), size=k, replace=False)
    else:
        idx = np.concatenate([rng.permutation(len(nodes)), rng.integers(0, len(nodes), k - len(nodes))])
    return [nodes[int(i)] for i in idx]


def round_quota(remaining: int, rounds_left: int) -> int:
    """Expansions of a tree in this round: ``ceil(remaining / rounds_left)``."""
    return -(-remaining // max(rounds_left, 1))


def tree_rollouts(engine: RolloutEngine, prompts: Sequence[Record], n: int, n_init: int, key, rounds: int,
                  progress=None) -> RolloutBatch:
    """Tree-GRPO groups of ``n`` rows (module doc): rows ``g * n + i``, ``i < n_init``, are the tree roots;
    expansions follow in creation order with ``parent`` / ``branch_pos`` set and ``tree_id`` = their root row.
    With ``rollout.kv_fork`` an expansion starts from a copy of its node's KV where its row's slot still holds it
    when the round starts (`fork_source`: the rows of the previous round, unless a later wave reused the slot)."""
    num_g, quota = len(prompts), expansion_counts(n, n_init)
    length = engine.cfg.max_response_len
    rng = np.random.default_rng(int(jax.random.randint(key, (), 0, 2 ** 31 - 1)))
    own = engine.own_groups(num_g)
    batch = engine.rollout([engine.request(key, prompts[g], g, i) for g in own for i in range(n_init)], num_g, n,
                           progress=progress)
    count = [n_init] * num_g
    remaining = {g * n + i: quota[i] for g in range(num_g) for i in range(n_init)}
    for rnd in range(rounds):
        traj, reqs, fork = batch.traj, [], fork_source(engine, batch)
        for tree_root, left in remaining.items():
            k = round_quota(left, rounds - rnd)
            if k == 0:
                continue
            remaining[tree_root] = left - k
            nodes = [(int(r), t) for r in np.flatnonzero(batch.tree_id == tree_root)
                     for t in step_nodes(traj.obs_mask[r], length, int(traj.branch_pos[r]))]
            picked = choose_nodes(nodes, k, rng) if nodes else [(tree_root, -1)] * k
            g = tree_root // n
            for r, t in picked:
                if g in own:
                    prefix = engine.branch_prefix(traj, r, t, batch.tool_calls[r]) if t >= 0 else None
                    reqs.append(attach_fork(engine.request(key, prompts[g], g, count[g], prefix=prefix,
                                                           kind=KIND_BRANCH, parent=r, branch_pos=t), fork, r))
                count[g] += 1
        batch = overlay_batches(batch, engine.rollout(reqs, num_g, n, progress=progress, parent_tree=batch.tree_id))
    return batch


@dataclass(frozen=True)
class TreeOptions:
    """Tree-GRPO's knobs: ``n`` rows per group, ``n_init`` trees, ``tree_rounds`` expansion rounds (the
    ``algorithm`` section's fields of the same names)."""

    n: int = 16
    n_init: int = 8
    tree_rounds: int = 1

    def __post_init__(self):
        check_budget(self.n, self.n_init)


@dataclass
class TreeSearch(EveryRowTrains):
    """Tree-GRPO (docs/algorithm.md §1.7): ``n_init`` trees per prompt expanded at random step nodes to ``n``
    rows (:func:`tree_rollouts`); every row trains."""

    options: TreeOptions = field(default_factory=TreeOptions)
    branches = True

    def draw(self, engine, prompts, key, progress):
        """:func:`tree_rollouts` with the options' knobs."""
        o = self.options
        return tree_rollouts(engine, prompts, o.n, o.n_init, key, o.tree_rounds, progress)


STRATEGIES.register("tree", TreeSearch, options=TreeOptions)
