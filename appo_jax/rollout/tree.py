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
"""
from __future__ import annotations

import numpy as np


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
