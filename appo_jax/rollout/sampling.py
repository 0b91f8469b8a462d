"""Token selection for the sampler: repetition penalty, temperature, top-k, top-p, greedy, and what is recorded.

Repetition penalty r (HF `RepetitionPenaltyLogitsProcessor`, CTRL): every token v that occurs anywhere in the
slot's sequence so far (prompt, generated and appended tokens: ``seen[v]``) has its logit replaced by

    l'_v = l_v / r   if l_v > 0,     l'_v = l_v * r   otherwise;      l'_v = l_v for tokens not seen.

r = 1 (the default) is off. It is an evaluation setting (docs/algorithm.md §1.8: 1.1); RL rollouts keep r = 1 so that
the trainer, which recomputes log p from the plain logits, scores the same distribution the sampler drew from.

The recorded distribution (one definition, used for both numbers the sampler returns):

    z       = l' / T                        (l' = logits after the repetition penalty; T = temperature,
                                             T = 1 for greedy decoding)
    log p   = log_softmax(z)                over the FULL vocabulary (float32)
    lb_t    = log p[a_t]                    the behaviour log-prob of the chosen token a_t
    H_t     = -sum_v p_v log p_v            exact full-vocabulary entropy (shifted form, as
                                            `appo_jax.core.branching.token_entropy`)

top-k / top-p only restrict *which* token can be drawn; they do not change lb_t or H_t. This matches what the
trainer recomputes (`log_softmax(logits / T)` of the taken token, docs/algorithm.md §1: "entropy of the sampling
distribution (after temperature)") and what the rollout default (top_p = 1, top_k = 0) samples from exactly;
with truncation on, lb_t is the log-prob under the temperature-scaled policy, not under the truncated one.

The allowed set (token v may be drawn iff):
    top-k (k > 0):  z_v >= the k-th largest z          (ties at the boundary are kept)
    top-p (p < 1):  on q = softmax(z) renormalised over the top-k set, sum of q_u over the tokens u kept before v
                    in descending-q order is < p, with ties of the last kept value kept: v kept iff
                    q_v >= q_(m), m = #{i : sum_{j<i} q_(j) < p} (q_(i) sorted descending) — the smallest
                    prefix of most likely tokens whose mass reaches p (always >= 1 token).
The token is then drawn from softmax(z) restricted (renormalised) to the allowed set by inverting its CDF at one
uniform u ~ U[0, 1) per token (two-level float32 cumulative sums over blocks of 128 vocabulary entries: exact up
to float32 rounding, and a token with probability 0 is never drawn); greedy takes argmax(logits) (lowest index
on ties). Both avoid per-vocabulary-entry random numbers and XLA's variadic argmax reduction, which dominate a
decode step on CPU at 49k-150k vocabularies.
"""
from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp

from appo_jax.core.branching import ENTROPY_MODES, topk_entropy

Array = jax.Array


@dataclasses.dataclass(frozen=True)
class SamplingParams:
    """How tokens are chosen. temperature = 0 means greedy (argmax); top_p in (0, 1] (1 = off); top_k >= 0
    (0 = off). ``entropy`` / ``entropy_k``: the recorded H_t, ``exact`` (full vocabulary) or from the k most
    likely tokens (`appo_jax.core.branching.topk_entropy`). Hashable: the sampler compiles one decode loop per
    distinct SamplingParams."""

    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    repetition_penalty: float = 1.0
    entropy: str = "exact"
    entropy_k: int = 10

    def __post_init__(self):
        if not (isinstance(self.temperature, (int, float)) and math.isfinite(self.temperature)
                and self.temperature >= 0):
            raise ValueError(f"SamplingParams.temperature must be a finite number >= 0 (0 = greedy), "
                             f"got {self.temperature!r}")
        if not (isinstance(self.top_p, (int, float)) and 0 < self.top_p <= 1):
            raise ValueError(f"SamplingParams.top_p must be in (0, 1], got {self.top_p!r}")
        if not (isinstance(self.top_k, int) and not isinstance(self.top_k, bool) and self.top_k >= 0):
            raise ValueError(f"SamplingParams.top_k must be an int >= 0 (0 = off), got {self.top_k!r}")
        if not (isinstance(self.repetition_penalty, (int, float)) and not isinstance(self.repetition_penalty, bool)
                and math.isfinite(self.repetition_penalty) and self.repetition_penalty > 0):
            raise ValueError(f"SamplingParams.repetition_penalty must be a finite number > 0 (1 = off), "
                             f"got {self.repetition_penalty!r}")
        if self.entropy not in ENTROPY_MODES:
            raise ValueError(f"SamplingParams.entropy must be one of {', '.join(ENTROPY_MODES)}, got {self.entropy!r}")
        if not (isinstance(self.entropy_k, int) and not isinstance(self.entropy_k, bool) and self.entropy_k >= 1):
            raise ValueError(f"SamplingParams.entropy_k must be an int >= 1, got {self.entropy_k!r}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0

    @property
    def record_temperature(self) -> float:
        """The T of the recorded distribution softmax(logits / T): the temperature, or 1 for greedy."""
        return 1.0 if self.greedy else float(self.temperature)

    @property
    def penalizes(self) -> bool:
        """Whether a repetition penalty is applied (r != 1); the sampler then tracks the tokens each slot has
        seen."""
        return self.repetition_penalty != 1

    @property
    def truncates(self) -> bool:
        """Whether top-k or top-p restricts the allowed set (never for greedy)."""
        return not self.greedy and (self.top_k > 0 or self.top_p < 1)


def log_probs_and_entropy(logits: Array, temperature: float = 1.0) -> tuple[Array, Array]:
    """(log p float32 [..., V], H float32 [...]) of p = softmax(logits / temperature) over the full vocabulary.

    log p = s - log(sum exp(s)) with s = z - max(z); H = -sum_v p_v log p_v, entries with p_v = 0 contribute 0.
    Same formula as `appo_jax.core.branching.token_entropy`, computed from one pass of log-probs.
    """
    log_p, _, entropy = _log_probs_probs_entropy(logits, temperature)
    return log_p, entropy


def _log_probs_probs_entropy(logits, temperature):
    z = logits.astype(jnp.float32) / jnp.float32(temperature)
    s = z - jnp.max(z, axis=-1, keepdims=True)
    log_p = s - jnp.log(jnp.sum(jnp.exp(s), axis=-1, keepdims=True))
    p = jnp.exp(log_p)
    entropy = jnp.sum(p * jnp.where(p > 0, -log_p, 0.0), axis=-1)
    return log_p, p, entropy


_BLOCK = 128


def _blocks(x: Array, fill) -> Array:
    """[B, V] -> [B, ceil(V / 128), 128], padded with `fill`."""
    pad = -x.shape[-1] % _BLOCK
    if pad:
        x = jnp.pad(x, ((0, 0), (0, pad)), constant_values=fill)
    return x.reshape(x.shape[0], -1, _BLOCK)


def _first_index(mask: Array) -> Array:
    """Index of the first True along the last axis (size if none), with plain min-reductions."""
    n = mask.shape[-1]
    return jnp.min(jnp.where(mask, jnp.arange(n, dtype=jnp.int32), n), axis=-1)


def _last_index(mask: Array) -> Array:
    """Index of the last True along the last axis (-1 if none)."""
    return jnp.max(jnp.where(mask, jnp.arange(mask.shape[-1], dtype=jnp.int32), -1), axis=-1)


def _pick_block(blocks: Array, index: Array) -> Array:
    return jnp.take_along_axis(blocks, index[:, None, None], axis=1)[:, 0]


def greedy_tokens(logits: Array) -> Array:
    """int32 [B]: argmax over the last axis of [B, V] (lowest index on ties), blockwise: the first block holding
    the maximum, then the first position of the maximum inside it."""
    blocks = _blocks(logits, -jnp.inf)
    block_max = jnp.max(blocks, axis=-1)
    top = jnp.max(block_max, axis=-1)
    b = jnp.minimum(_first_index(block_max == top[:, None]), blocks.shape[1] - 1)
    t = jnp.minimum(_first_index(_pick_block(blocks, b) == top[:, None]), _BLOCK - 1)
    return (b * _BLOCK + t).astype(jnp.int32)


def inverse_cdf_tokens(weights: Array, u: Array) -> Array:
    """int32 [B]: for unnormalised weights [B, V] >= 0 (not all 0) and u [B] in [0, 1), the token v with
    W(v-1) <= u * W(V) < W(v), W = cumulative sum of weights, computed in two levels (block sums, then inside the
    chosen block); clipping to the first / last positive entry keeps float rounding from choosing a 0 weight."""
    blocks = _blocks(weights, 0.0)
    block_sum = jnp.sum(blocks, axis=-1)
    block_cum = jnp.cumsum(block_sum, axis=-1)
    target = u * block_cum[:, -1]
    positive = block_sum > 0
    b = jnp.sum(block_cum <= target[:, None], axis=-1).astype(jnp.int32)
    b = jnp.clip(b, _first_index(positive), _last_index(positive))
    inside = _pick_block(blocks, b)
    rest = target - jnp.take_along_axis(block_cum - block_sum, b[:, None], axis=-1)[:, 0]
    t = jnp.sum(jnp.cumsum(inside, axis=-1) <= rest[:, None], axis=-1).astype(jnp.int32)
    t = jnp.clip(t, _first_index(inside > 0), _last_index(inside > 0))
    return (b * _BLOCK + t).astype(jnp.int32)


def allowed_tokens(log_p: Array, top_k: int = 0, top_p: float = 1.0) -> Array:
    """bool [..., V]: the tokens that top-k then top-p (module doc) allow, given log p = log_softmax(z).

    top_k and top_p are static Python numbers (0 / 1.0 = off). The top-p threshold q_(m) is found without sorting
    the vocabulary: it is the largest float32 x with f(x) = sum_{v : q_v >= x} q_v >= p (f steps down only at the
    values q_v, and f(q_(m)) >= p > f(x) for every x > q_(m)), located by bisection over the bit patterns of the
    non-negative float32 numbers (monotone in the value) in 31 masked sums over V — a full sort of a 49k
    vocabulary per row costs ten times a whole decode step on CPU.
    """
    vocab = log_p.shape[-1]
    allowed = jnp.ones(log_p.shape, jnp.bool_)
    if 0 < top_k < vocab:
        kth = jax.lax.top_k(log_p, top_k)[0][..., -1:]
        allowed = log_p >= kth
    if top_p < 1:
        q = jax.nn.softmax(jnp.where(allowed, log_p, -jnp.inf), axis=-1)
        allowed = allowed & (q >= top_p_threshold(q, top_p)[..., None])
    return allowed


def top_p_threshold(q: Array, top_p: float) -> Array:
    """float32 [...]: q_(m), the smallest kept probability of top-p over q [..., V] (module doc), as the largest
    float32 x with sum_{v : q_v >= x} q_v >= top_p (bisection over float32 bit patterns; 0 when even x = 0 fails,
    i.e. when rounding makes the total mass < top_p: then every token is kept)."""
    q = q.astype(jnp.float32)

    def mass_at_least(bits):
        x = jax.lax.bitcast_convert_type(bits, jnp.float32)[..., None]
        return jnp.sum(jnp.where(q >= x, q, 0.0), axis=-1)

    def step(_, bounds):
        lo, hi = bounds  # invariant: mass_at_least(lo) >= top_p (or lo = 0), mass_at_least(hi) < top_p
        mid = lo + (hi - lo) // 2
        ok = mass_at_least(mid) >= top_p
        return jnp.where(ok, mid, lo), jnp.where(ok, hi, mid)

    lo = jnp.zeros(q.shape[:-1], jnp.int32)
    hi = jax.lax.bitcast_convert_type(jnp.max(q, axis=-1), jnp.int32) + 1
    lo, _ = jax.lax.fori_loop(0, 31, step, (lo, hi))
    return jax.lax.bitcast_convert_type(lo, jnp.float32)


def apply_repetition_penalty(logits: Array, seen: Array, penalty: float) -> Array:
    """l' = where(seen, where(l > 0, l / r, l * r), l) for logits [..., V] and bool seen [..., V] (module doc);
    float32 result."""
    logits = logits.astype(jnp.float32)
    r = jnp.float32(penalty)
    return jnp.where(seen, jnp.where(logits > 0, logits / r, logits * r), logits)


def select_tokens(logits: Array, keys: Array, params: SamplingParams,
                  seen: Array | None = None) -> tuple[Array, Array, Array]:
    """Choose one token per row and record it: logits float [B, V], keys [B] typed PRNG keys (one per row; the
    row's uniform is `jax.random.uniform(key)`), ``seen`` bool [B, V] the tokens in each row's sequence (needed
    iff ``params.penalizes``).

    Returns (tokens int32 [B], log-prob float32 [B] of the chosen token under softmax(l' / T_rec),
    entropy float32 [B] of that distribution -- exact, or from its top-k per ``params.entropy``), l' the logits
    after the repetition penalty, T_rec = `params.record_temperature` (module doc).
    """
    if params.penalizes:
        if seen is None:
            raise ValueError("select_tokens: a repetition penalty needs `seen` (bool [B, V])")
        logits = apply_repetition_penalty(logits, seen, params.repetition_penalty)
    log_p, p, entropy = _log_probs_probs_entropy(logits, params.record_temperature)
    if params.greedy:
        tokens = greedy_tokens(logits)
    else:
        if params.truncates:
            p = jnp.where(allowed_tokens(log_p, params.top_k, params.top_p), p, 0.0)
        u = jax.vmap(lambda k: jax.random.uniform(k, (), jnp.float32))(keys)
        tokens = inverse_cdf_tokens(p, u)
    token_log_p = jnp.take_along_axis(log_p, tokens[:, None], axis=-1)[:, 0]
    if params.entropy != "exact":
        entropy = topk_entropy(log_p, tokens, params.entropy_k, params.entropy)
    return tokens, token_log_p, entropy
