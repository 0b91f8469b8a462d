"""The Trajectory batch: the one pytree that carries rollouts through the pipeline (docs/architecture.md).

All per-token arrays are ``[N, L]`` over *response* positions (L = max response length); prompts are kept
left-padded in ``[N, P]`` arrays so that ``concat(prompt_tokens, tokens)`` is the full model input. Rows are
``N = num_groups * n`` rollouts ordered group-major; padding rows have ``row_valid = False``.
Stages of the pipeline are functions ``Trajectory -> Trajectory`` (``dataclasses.replace`` / ``.replace``).
"""
from __future__ import annotations

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

Array = jax.Array

KIND_INIT = 0
KIND_BRANCH = 1

# finish reasons
FINISH_NONE = 0        # still running / padding row
FINISH_ANSWER = 1      # produced </answer>
FINISH_EOS = 2         # produced EOS
FINISH_LENGTH = 3      # hit the response-length budget
FINISH_TOOL_LIMIT = 4  # exceeded the tool-call limit (format failure)
FINISH_NAMES = ("none", "answer", "eos", "length", "tool_limit")


@flax.struct.dataclass
class Trajectory:
    """A static-shape batch of rollouts.

    Per token ``[N, L]``: ``tokens`` (response token ids, pad elsewhere), ``gen_mask`` (1 for tokens the
    policy generated: the loss/branch mask m_t), ``obs_mask`` (1 for tool-result observation tokens),
    ``behavior_logp`` (log pi_b(a_t|s_t), 0 where not generated), ``entropy`` (H_t of the sampling
    distribution, 0 where not generated), ``loss_mask`` (gen_mask and not a branch row).
    Per prompt ``[N, P]``: ``prompt_tokens`` (left-padded), ``prompt_mask``.
    Per row ``[N]``: ``group_id`` (prompt group, -1 for padding rows), ``kind`` (KIND_INIT / KIND_BRANCH),
    ``parent`` (row index of the parent for branch rows, -1 otherwise), ``branch_pos`` (response position
    t_j the branch continues after, -1 otherwise), ``branch_score`` (BS at the branch point, 0 otherwise),
    ``reward``, ``tool_calls``, ``finish_reason``, ``row_valid``.
    """

    prompt_tokens: Array
    prompt_mask: Array
    tokens: Array
    gen_mask: Array
    obs_mask: Array
    behavior_logp: Array
    entropy: Array
    group_id: Array
    kind: Array
    parent: Array
    branch_pos: Array
    branch_score: Array
    reward: Array
    tool_calls: Array
    finish_reason: Array
    row_valid: Array

    @property
    def num_rows(self) -> int:
        return self.tokens.shape[0]

    @property
    def max_len(self) -> int:
        return self.tokens.shape[1]

    @property
    def is_branch(self) -> Array:
        return self.kind == KIND_BRANCH

    @property
    def response_mask(self) -> Array:
        """Tokens present in the response (generated or observation)."""
        return self.gen_mask | self.obs_mask

    @property
    def loss_mask(self) -> Array:
        """m_t restricted to initial rollouts: branch rows never enter the policy loss (docs/algorithm.md §1.3)."""
        return self.gen_mask & (~self.is_branch)[:, None] & self.row_valid[:, None]

    @classmethod
    def empty(cls, num_rows: int, max_len: int, prompt_len: int, pad_id: int = 0) -> "Trajectory":
        """An all-padding batch of the given static shape (host NumPy arrays)."""
        return TrajectoryBuilder(num_rows, max_len, prompt_len, pad_id).build()


class TrajectoryBuilder:
    """Host-side assembly of a `Trajectory`: writable NumPy buffers of the static shape, filled row by row
    (`set_row`, or rows copied from an existing batch with `copy_rows`), then frozen into the immutable pytree by
    `build` (which hands the buffers over: the builder must not be written to afterwards)."""

    def __init__(self, num_rows: int, max_len: int, prompt_len: int, pad_id: int = 0):
        n, l, p = num_rows, max_len, prompt_len
        self.pad_id = pad_id
        self.arrays = dict(
            prompt_tokens=np.full((n, p), pad_id, np.int32),
            prompt_mask=np.zeros((n, p), bool),
            tokens=np.full((n, l), pad_id, np.int32),
            gen_mask=np.zeros((n, l), bool),
            obs_mask=np.zeros((n, l), bool),
            behavior_logp=np.zeros((n, l), np.float32),
            entropy=np.zeros((n, l), np.float32),
            group_id=np.full((n,), -1, np.int32),
            kind=np.zeros((n,), np.int32),
            parent=np.full((n,), -1, np.int32),
            branch_pos=np.full((n,), -1, np.int32),
            branch_score=np.zeros((n,), np.float32),
            reward=np.zeros((n,), np.float32),
            tool_calls=np.zeros((n,), np.int32),
            finish_reason=np.zeros((n,), np.int32),
            row_valid=np.zeros((n,), bool),
        )

    def set_row(self, i: int, *, prompt_ids, tokens, gen_mask, obs_mask, behavior_logp, entropy, group: int,
                kind: int, parent: int = -1, branch_pos: int = -1, branch_score: float = 0.0, reward: float = 0.0,
                tool_calls: int = 0, finish_reason: int = FINISH_NONE) -> None:
        """Row ``i`` from one rollout: the prompt right-aligned in ``[P]``, the response arrays at the start of
        ``[L]`` (their common length k <= L), the per-row fields, ``row_valid = True``."""
        a, p_len, k = self.arrays, len(prompt_ids), len(tokens)
        a["prompt_tokens"][i, a["prompt_tokens"].shape[1] - p_len:] = prompt_ids
        a["prompt_mask"][i, a["prompt_mask"].shape[1] - p_len:] = True
        for name, value in (("tokens", tokens), ("gen_mask", gen_mask), ("obs_mask", obs_mask),
                            ("behavior_logp", behavior_logp), ("entropy", entropy)):
            a[name][i, :k] = value
        for name, value in (("group_id", group), ("kind", kind), ("parent", parent), ("branch_pos", branch_pos),
                            ("branch_score", branch_score), ("reward", reward), ("tool_calls", tool_calls),
                            ("finish_reason", finish_reason), ("row_valid", True)):
            a[name][i] = value

    def set_kind(self, i: int, kind: int) -> None:
        """The ``kind`` of row ``i`` (also for a padding row, which keeps ``row_valid = False``)."""
        self.arrays["kind"][i] = kind

    def copy_rows(self, dst: slice, source: Trajectory, src: slice, group: int | None = None) -> None:
        """Rows ``src`` of ``source`` into rows ``dst``; their valid rows get group id ``group`` when given."""
        for name, buf in self.arrays.items():
            buf[dst] = np.asarray(getattr(source, name))[src]
        if group is not None:
            valid = self.arrays["row_valid"][dst]
            self.arrays["group_id"][dst] = np.where(valid, group, -1)

    def build(self) -> Trajectory:
        """The immutable `Trajectory` of the buffers."""
        return Trajectory(**self.arrays)


def to_device(traj: Trajectory) -> Trajectory:
    """Host NumPy Trajectory -> jax arrays (same dtypes)."""
    return jax.tree_util.tree_map(jnp.asarray, traj)
