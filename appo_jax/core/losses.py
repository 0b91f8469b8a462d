"""Policy losses: PPO clip (separate low / high epsilon), dual clip, the APPO future-KL loss, the AEPO
stop-gradient clip-high, GPPO, CISPO, KL penalties and loss aggregation (docs/algorithm.md §1.6, §1.7, §1.9).

Conventions:

* Inputs are ``[N, L]`` (advantages may be ``[N]``, broadcast over tokens). Log-probs are computed in
  float32 whatever the input dtype (bf16 / f16 are upcast; float64 stays float64 under ``jax.enable_x64``,
  which the finite-difference tests use). ``mode`` / ``agg`` / ``kl_kind`` are static Python strings.
* Gradients flow only through ``logp`` (and ``entropy`` for the entropy bonus); ``old_logp``, ``ref_logp``
  and ``advantages`` are data (``stop_gradient``).
* **Bad input** (documented behaviour, never a silent NaN): a valid token (``mask`` true) whose ``logp``,
  ``old_logp`` or advantage — or ``ref_logp`` / ``entropy`` when those are used — is NaN or +-inf is
  removed from the mask and counted in ``metrics["nonfinite_tokens"]``. Values at masked positions never
  reach the arithmetic (they are replaced with ``where`` *before* any operation: the double-where trick),
  so NaN / inf there changes neither the loss nor the gradients, and the gradient there is exactly 0.
  An all-masked batch gives loss 0 and an all-zero gradient.

**Loss modes are token losses in a registry.** Each mode (``ppo``, ``dual_clip``, ``future_kl``, ``aepo``,
``gppo``, ``cispo``) is a *token loss* registered under its name in
:data:`appo_jax.core.registry.POLICY_LOSSES`; :func:`policy_loss` ``(..., mode=name)`` looks it up and wraps it with
the parts every mode shares (non-finite removal, truncated importance sampling, KL and entropy terms,
aggregation, metrics). A token loss is called as::

    loss_t, stats = fn(lp, lp_old, A, m, *, clip_low, clip_high, clip_ratio_c, decay_rate, fkl_clip,
                       fkl_high_only, fkl_weight, safety_thresh)

with sanitised float ``[N, L]`` arrays (``m`` the mask after the non-finite removal, every value 0 where ``m`` is
false; ``lp_old`` and ``A`` detached) and every mode option of :func:`policy_loss` as a keyword (a token loss
takes the ones it uses and ``**_``). It returns the per-token loss ``loss_t`` ``[N, L]`` (values where ``m`` is
false are ignored) and a dict ``stats`` with any of: ``"dual"`` (bool ``[N, L]``, the lower-dual-clipped tokens:
metric ``clip_frac_dual``), ``"fkl_weight"`` (``[N, L]``, the future-KL weights: metrics ``fkl_weight_*``),
``"drop_rows"`` (bool ``[N]``, rows removed from the final mask). A new mode is one decorated function::

    @POLICY_LOSSES.register("reinforce")
    def reinforce(lp, lp_old, A, m, **_):  # loss_t = -A_t lp_t
        return -A * lp, {}

after which ``loss.mode = "reinforce"`` validates and trains. The built-in token losses use the guarded ratio
``r_t = exp(clip(lp_t - lp_old_t, -20, 20))``: the ±20 guard bounds the values (no overflow) but also removes the
gradient of ``r`` beyond it, so the gradient-preserving clips (``aepo``, ``gppo``) carry theirs with
``exp(lp - sg(lp))`` (value 1, gradient ``grad lp = grad log r``), which no guard touches.
"""
from __future__ import annotations

import math

import jax
import jax.numpy as jnp

from appo_jax.core.registry import POLICY_LOSSES
from appo_jax.core.scan import reverse_discounted_cumsum

Array = jax.Array

LOG_RATIO_CLIP = 20.0
KL_CLAMP = 10.0
KL_KINDS = ("k1", "kl", "abs", "k2", "mse", "k3", "low_var_kl")
AGGS = ("token-mean", "seq-mean-token-sum", "seq-mean-token-mean")


def _float(x) -> Array:
    """At least float32 (bf16/f16/int -> float32; float64 kept, which only exists under x64)."""
    x = jnp.asarray(x)
    return x.astype(jnp.promote_types(x.dtype, jnp.float32))


def _bool(x) -> Array:
    return jnp.asarray(x).astype(bool)


def kl_penalty(logp, ref_logp, kind: str = "low_var_kl") -> Array:
    """Per-token KL(pi_theta || pi_ref) estimate from sampled-token log-probs (elementwise, no masking).

    With ``d = logp - ref_logp``:
    ``"k1"``/``"kl"``: d;  ``"abs"``: |d|;  ``"k2"``/``"mse"``: 0.5 d^2;
    ``"k3"``/``"low_var_kl"``: ``exp(-d') + d' - 1`` with ``d' = clip(d, -20, 20)`` (the clip only guards
    ``exp`` against overflow), then clamped to [-10, 10].
    Unknown ``kind`` -> ``ValueError`` listing the known kinds.
    """
    if kind not in KL_KINDS:
        raise ValueError(f"unknown kl kind {kind!r}; known: {', '.join(KL_KINDS)}")
    d = _float(logp) - _float(ref_logp)
    if kind in ("k1", "kl"):
        return d
    if kind == "abs":
        return jnp.abs(d)
    if kind in ("k2", "mse"):
        return 0.5 * d * d
    r = -jnp.clip(d, -LOG_RATIO_CLIP, LOG_RATIO_CLIP)  # log(pi_ref / pi_theta)
    return jnp.clip(jnp.exp(r) - r - 1.0, -KL_CLAMP, KL_CLAMP)


def _log_ratio(logp, old_logp) -> Array:
    """``d_t = clip(lp_t - lp_old_t, -20, 20)``."""
    return jnp.clip(logp - old_logp, -LOG_RATIO_CLIP, LOG_RATIO_CLIP)


def _future_kl_weights(d, adv, mask, *, decay_rate, clip_eps, high_only, clip_ratio_c, safety_thresh):
    """:func:`future_kl_weights` on already-sanitised inputs (d finite everywhere); ``decay_rate`` must be > 0."""
    if isinstance(decay_rate, (int, float)) and decay_rate <= 0:
        raise ValueError(f"decay_rate must be > 0, got {decay_rate}")
    d = jax.lax.stop_gradient(d)
    p = d <= jnp.log(clip_ratio_c)
    gamma = 2.0 ** (-1.0 / decay_rate)
    big_g = reverse_discounted_cumsum(d, gamma, mask=mask & p, axis=-1).astype(d.dtype)
    lo = 1.0 if high_only else 1.0 - clip_eps
    w = jnp.clip(jnp.exp(big_g), lo, 1.0 + clip_eps)
    w = jnp.where((adv < 0) & (jnp.exp(d) > safety_thresh), jnp.clip(w, 0.8, 1.0), w)
    return jax.lax.stop_gradient(jnp.where(mask, w, 0.0))


def future_kl_weights(logp, old_logp, advantages, mask, *, decay_rate: float = 64.0, clip_eps: float = 0.2,
                      high_only: bool = True, clip_ratio_c: float = 3.0, safety_thresh: float = 6.0) -> Array:
    """Future-KL advantage weights w ``[N, L]`` (docs/algorithm.md §1.6), no gradient (``stop_gradient``)::

        d_t = clip(lp_t - lp_old_t, -20, 20),  r_t = exp(d_t),  p_t = [d_t <= ln c]
        G_t = sum_{k >= t} g^(k - t) m_k p_k d_k,   g = 2^(-1 / decay_rate)     (O(L) reverse scan)
        w_t = clip(exp(G_t), lo, 1 + clip_eps),     lo = 1 if high_only else 1 - clip_eps
        w_t = clip(w_t, 0.8, 1.0)  where A_t < 0 and r_t > safety_thresh        (safety cap)

    ``m`` is ``mask`` minus non-finite tokens (module docstring). w is 0 where m is 0 (so that
    ``1 + b w`` is neutral there).
    """
    lp, old, adv, m, _ = _sanitise(logp, old_logp, advantages, mask)
    return _future_kl_weights(_log_ratio(lp, old), adv, m, decay_rate=decay_rate, clip_eps=clip_eps,
                              high_only=high_only, clip_ratio_c=clip_ratio_c, safety_thresh=safety_thresh)


def _sanitise(logp, old_logp, advantages, mask, *extra):
    """Cast, broadcast, drop non-finite valid tokens from the mask, and zero every masked value.

    Returns ``(logp, old_logp, advantages, mask, nonfinite, *extra)`` with all arrays ``[N, L]`` (``nonfinite``:
    the valid tokens dropped for a non-finite value, boolean);
    ``extra`` entries may be None (ignored). The zeroing happens before any arithmetic, so gradients at
    masked positions are exactly 0 and never NaN.
    """
    lp = _float(logp)
    if lp.ndim != 2:
        raise ValueError(f"logp must be [N, L], got shape {lp.shape}")
    shape = lp.shape
    m = _bool(mask)
    if m.shape != shape:
        raise ValueError(f"mask shape {m.shape} != logp shape {shape}")
    old = _float(old_logp)
    if old.shape != shape:
        raise ValueError(f"old_logp shape {old.shape} != logp shape {shape}")
    adv = _float(advantages)
    if adv.shape == shape[:1]:
        adv = adv[:, None]
    if adv.ndim != 2 or adv.shape[0] != shape[0] or adv.shape[1] not in (1, shape[1]):
        raise ValueError(f"advantages must be [N, L] or [N] for logp shape {shape}, got {adv.shape}")
    adv = jnp.broadcast_to(adv, shape)
    extras = [None if e is None else jnp.broadcast_to(_float(e), shape) for e in extra]
    finite = jnp.isfinite(lp) & jnp.isfinite(old) & jnp.isfinite(adv)
    for e in extras:
        if e is not None:
            finite = finite & jnp.isfinite(e)
    nonfinite = m & ~finite
    m = m & finite
    dtype = lp.dtype
    zero = jnp.zeros((), dtype)
    out = [jnp.where(m, lp, zero), jax.lax.stop_gradient(jnp.where(m, old.astype(dtype), zero)),
           jax.lax.stop_gradient(jnp.where(m, adv.astype(dtype), zero)), m, nonfinite]
    out += [None if e is None else jnp.where(m, e.astype(dtype), zero) for e in extras]
    return tuple(out)


def aggregate(values, mask, agg: str = "token-mean") -> Array:
    """Aggregate per-token values over the valid tokens (``mask``) into a scalar.

    ``"token-mean"``: ``sum_{i,t} m v / sum_{i,t} m`` (every valid token of the batch weighs the same).
    ``"seq-mean-token-sum"``: mean over rows with at least one valid token of ``sum_t m v``.
    ``"seq-mean-token-mean"``: mean over rows with at least one valid token of ``sum_t m v / sum_t m``.
    Rows without valid tokens are left out of the row mean (not counted as 0); with no valid token at all
    the result is 0. Unknown ``agg`` -> ``ValueError``.
    """
    if agg not in AGGS:
        raise ValueError(f"unknown loss aggregation {agg!r}; known: {', '.join(AGGS)}")
    m = _bool(mask)
    v = jnp.where(m, _float(values), 0.0)
    if agg == "token-mean":
        return jnp.sum(v) / jnp.maximum(jnp.sum(m, dtype=v.dtype), 1.0)
    row_count = jnp.sum(m, axis=-1, dtype=v.dtype)
    row_sum = jnp.sum(v, axis=-1)
    if agg == "seq-mean-token-mean":
        row_sum = row_sum / jnp.maximum(row_count, 1.0)
    has = row_count > 0
    return jnp.sum(jnp.where(has, row_sum, 0.0)) / jnp.maximum(jnp.sum(has, dtype=v.dtype), 1.0)


def _partial_reduce(sums: dict, mins: dict, maxs: dict) -> tuple[dict, dict, dict]:
    """Named partial sums / mins / maxs of ``[N, L]`` arrays in one variadic reduction (one fused pass over the
    tokens instead of one per statistic; `benchmarks/core_ops.py` measured it 1.3x faster than separate
    reductions). Each array is viewed as ``[N, L / k, k]`` (``k = gcd(L, 128)``) and reduced over the middle
    axis, which keeps ``k`` independent accumulators per row (vectorisable, and a shorter rounding chain than a
    sequential row sum); returns the ``[N, k]`` partials under the same names, for the caller to finish with
    ``jnp.sum`` / ``min`` / ``max``."""
    groups = {"sum": sums, "min": mins, "max": maxs}
    keys = [(kind, name) for kind, group in groups.items() for name in group]
    kinds = [kind for kind, _ in keys]
    arrays = [groups[kind][name] for kind, name in keys]
    n, length = arrays[0].shape
    k = math.gcd(length, 128)
    ops = tuple(x.reshape(n, length // k, k) for x in arrays)
    start = {"sum": 0.0, "min": jnp.inf, "max": -jnp.inf}
    inits = tuple(jnp.full((), start[kind], x.dtype) for kind, x in zip(kinds, arrays))
    op = {"sum": jnp.add, "min": jnp.minimum, "max": jnp.maximum}

    def combine(a, b):
        return tuple(op[kind](x, y) for kind, x, y in zip(kinds, a, b))

    out = dict(zip(keys, jax.lax.reduce(ops, inits, combine, (1,))))
    return tuple({name: out[kind, name] for name in group} for kind, group in groups.items())


def loss_metrics(parts: tuple[dict, dict, dict], dropped, loss, pg) -> dict:
    """The named metrics of :func:`policy_loss` from its per-row partials ``parts`` (`_partial_reduce` of the
    token statistics), the rows ``dropped`` by the future-KL row drop, and the loss / policy-gradient loss
    values. Means are over the valid tokens before the row drop; zero where nothing is valid."""
    sums, mins, maxs = parts
    sg = jax.lax.stop_gradient
    dt = loss.dtype
    zero = jnp.zeros((), dt)
    row_count = jnp.sum(sums["valid"], axis=-1)
    count = jnp.sum(row_count)
    any_ = count > 0

    def mean(name):
        return jnp.sum(sums[name]) / jnp.maximum(count, 1.0) if name in sums else zero

    def lo(name):
        return jnp.where(any_, jnp.min(mins[name]), zero) if name in mins else zero

    def hi(name):
        return jnp.where(any_, jnp.max(maxs[name]), zero) if name in maxs else zero

    rows_with_tokens = row_count > 0
    return {
        "loss": sg(loss),
        "pg_loss": sg(pg),
        "clip_frac_low": mean("clip_low"),
        "clip_frac_high": mean("clip_high"),
        "clip_frac_dual": mean("dual"),
        "ratio_mean": mean("ratio"),
        "ratio_min": lo("ratio"),
        "ratio_max": hi("ratio"),
        "approx_kl": mean("neg_log_ratio"),
        "fkl_weight_mean": mean("fkl_weight"),
        "fkl_weight_min": lo("fkl_weight"),
        "fkl_weight_max": hi("fkl_weight"),
        "kl": mean("kl"),
        "entropy": mean("entropy"),
        "tis_weight_mean": mean("tis_weight"),
        "tis_capped_frac": mean("tis_capped"),
        "dropped_row_frac": jnp.sum(dropped & rows_with_tokens, dtype=dt)
        / jnp.maximum(jnp.sum(rows_with_tokens, dtype=dt), 1.0),
        "valid_tokens": jnp.sum(jnp.where(rows_with_tokens & ~dropped, row_count, zero)),
        "nonfinite_tokens": jnp.sum(sums["nonfinite"]),
    }


def _check_options(agg, kl_kind, kl_coef, ref_logp, entropy_coef, entropy, tis_cap, behavior_logp):
    if agg not in AGGS:
        raise ValueError(f"unknown loss aggregation {agg!r}; known: {', '.join(AGGS)}")
    if kl_kind not in KL_KINDS:
        raise ValueError(f"unknown kl_kind {kl_kind!r}; known: {', '.join(KL_KINDS)}")
    if ref_logp is None and not (isinstance(kl_coef, (int, float)) and kl_coef == 0):
        raise ValueError("kl_coef != 0 needs ref_logp")
    if entropy is None and not (isinstance(entropy_coef, (int, float)) and entropy_coef == 0):
        raise ValueError("entropy_coef != 0 needs entropy")
    if tis_cap is not None:
        if not (isinstance(tis_cap, (int, float)) and math.isfinite(tis_cap) and tis_cap > 0):
            raise ValueError(f"loss.tis_cap={tis_cap!r}: the truncated importance-sampling cap must be a number > 0 "
                             f"(None = off)")
        if behavior_logp is None:
            raise ValueError("loss.tis_cap needs the sampler's behaviour log-probs (behavior_logp)")


def tis_weights(old_logp, behavior_logp, mask, cap: float) -> Array:
    """Token-level truncated importance sampling (sampler / trainer mismatch, ``loss.tis_cap``)::

        w_t = sg(min(exp(clip(lc_t - lb_t, -20, 20)), C))     where mask_t, else 0

    ``lc`` = ``old_logp`` (the trainer's log-prob of the token before the update), ``lb`` = ``behavior_logp``
    (the sampler's), ``C`` = ``cap`` > 0. The policy-gradient term of each token is multiplied by w_t."""
    d = jnp.clip(_float(old_logp) - _float(behavior_logp), -LOG_RATIO_CLIP, LOG_RATIO_CLIP)
    return jax.lax.stop_gradient(jnp.where(_bool(mask), jnp.minimum(jnp.exp(d), cap), 0.0))


# ------------------------------------------------------------------- token losses (module docstring)
def _keep(lp) -> Array:
    """``exp(lp - sg(lp))``: value 1, gradient ``grad lp`` (= ``grad log r``, lp_old being data), so ``c * _keep(lp)``
    has the value c and the gradient ``c grad log r`` at any log-ratio, the ±20 guard of r included."""
    return jnp.exp(lp - jax.lax.stop_gradient(lp))


def _clip_objective(r, r_clip, adv) -> Array:
    """``Lc = max(-A r, -A r_clip)``."""
    return jnp.maximum(-adv * r, -adv * r_clip)


def _dual_clip(lc, adv, mask, clip_ratio_c):
    """``(loss_t, {"dual": ...})`` with ``loss_t = min(-A c, Lc)`` where A < 0, else Lc, and dual the masked tokens
    with A < 0 and ``Lc > -A c`` (c = ``clip_ratio_c``, must be > 1)."""
    if isinstance(clip_ratio_c, (int, float)) and clip_ratio_c <= 1.0:
        raise ValueError(f"clip_ratio_c must be > 1 for the dual clip, got {clip_ratio_c}")
    l3 = -adv * clip_ratio_c
    return jnp.where(adv < 0, jnp.minimum(l3, lc), lc), {"dual": mask & (adv < 0) & (lc > l3)}


@POLICY_LOSSES.register("ppo")
def ppo_loss(lp, old, adv, mask, *, clip_low, clip_high, **_):
    """``loss_t = Lc = max(-A r, -A clip(r, 1 - clip_low, 1 + clip_high))``, ``r = exp(clip(lp - lp_old, -20, 20))``."""
    r = jnp.exp(_log_ratio(lp, old))
    return _clip_objective(r, jnp.clip(r, 1.0 - clip_low, 1.0 + clip_high), adv), {}


@POLICY_LOSSES.register("dual_clip")
def dual_clip_loss(lp, old, adv, mask, *, clip_low, clip_high, clip_ratio_c, **_):
    """``loss_t = min(-A c, Lc)`` where A < 0, else Lc (Lc of :func:`ppo_loss`, c = ``clip_ratio_c`` > 1); the
    tokens with A < 0 and ``Lc > -A c`` are ``stats["dual"]``."""
    lc, _ = ppo_loss(lp, old, adv, mask, clip_low=clip_low, clip_high=clip_high)
    return _dual_clip(lc, adv, mask, clip_ratio_c)


@POLICY_LOSSES.register("future_kl")
def future_kl_loss(lp, old, adv, mask, *, clip_low, clip_high, clip_ratio_c, decay_rate, fkl_clip, fkl_high_only,
                   fkl_weight, safety_thresh, **_):
    """APPO: :func:`dual_clip_loss` with ``A~ = A (1 + fkl_weight w)``, w = :func:`future_kl_weights` (no gradient);
    rows with more than one lower-dual-clipped token (A~ < 0 and ``Lc > -A~ c``) are ``stats["drop_rows"]``."""
    w = _future_kl_weights(_log_ratio(lp, old), adv, mask, decay_rate=decay_rate, clip_eps=fkl_clip,
                           high_only=fkl_high_only, clip_ratio_c=clip_ratio_c, safety_thresh=safety_thresh)
    tok, stats = dual_clip_loss(lp, old, adv * (1.0 + fkl_weight * w), mask, clip_low=clip_low, clip_high=clip_high,
                                clip_ratio_c=clip_ratio_c)
    return tok, {**stats, "fkl_weight": w, "drop_rows": jnp.sum(stats["dual"], axis=-1) > 1}


@POLICY_LOSSES.register("aepo")
def aepo_loss(lp, old, adv, mask, *, clip_low, clip_high, clip_ratio_c, **_):
    """AEPO: :func:`dual_clip_loss` with ``Lc = max(-A r, -A r_clip)``, ``r_clip = (1 + clip_high) exp(lp - sg(lp))``
    where ``r > 1 + clip_high``, else ``clip(r, 1 - clip_low, 1 + clip_high)`` (the clipped value, the gradient
    ``-A (1 + clip_high) grad log pi`` for A > 0)."""
    r = jnp.exp(_log_ratio(lp, old))
    hi = 1.0 + clip_high
    r_clip = jnp.where(r > hi, hi * _keep(lp), jnp.clip(r, 1.0 - clip_low, hi))
    return _dual_clip(_clip_objective(r, r_clip, adv), adv, mask, clip_ratio_c)


@POLICY_LOSSES.register("gppo")
def gppo_loss(lp, old, adv, mask, *, clip_low, clip_high, **_):
    """GPPO: ``loss_t = -A q`` with ``q = (1 + clip_high) exp(lp - sg(lp))`` where A > 0 and ``r > 1 + clip_high``,
    ``q = (1 - clip_low) exp(lp - sg(lp))`` where A < 0 and ``r < 1 - clip_low``, else ``q = r`` (the PPO-clip
    value; the clipped tokens' gradient ``-A (1 +- eps) grad log pi`` at any log-ratio)."""
    r = jnp.exp(_log_ratio(lp, old))
    hi, lo = 1.0 + clip_high, 1.0 - clip_low
    keep = _keep(lp)
    q = jnp.where((adv > 0) & (r > hi), hi * keep, jnp.where((adv < 0) & (r < lo), lo * keep, r))
    return -adv * q, {}


@POLICY_LOSSES.register("cispo")
def cispo_loss(lp, old, adv, mask, *, clip_high, **_):
    """CISPO: ``loss_t = -sg(min(r, 1 + clip_high)) A lp``."""
    r = jnp.exp(_log_ratio(lp, old))
    return -jax.lax.stop_gradient(jnp.minimum(r, 1.0 + clip_high)) * adv * lp, {}


def _loss_statistics(lp, old, adv, m, nonfinite, stats: dict, kl_tok, ent, w_tis, *, clip_low: float,
                     clip_high: float, tis_cap):
    """The per-device partial sums / minima / maxima of `policy_loss`'s metrics (`_partial_reduce`), every
    statistic in one fused pass over ``[N, L]``: valid tokens, low / high / dual clips, the ratio ``r = exp(d)``,
    ``-d``, non-finite tokens, and where present the future-KL weights, the KL penalty, the entropy and the TIS
    weights (all without gradient)."""
    sg = jax.lax.stop_gradient
    dt = lp.dtype
    zero = jnp.zeros((), dt)
    d = _log_ratio(lp, old)
    r_sg = sg(jnp.exp(d))
    hi = 1.0 + clip_high
    sums = {"valid": m.astype(dt), "clip_low": ((adv < 0) & (r_sg < 1.0 - clip_low) & m).astype(dt),
            "clip_high": ((adv > 0) & (r_sg > hi) & m).astype(dt), "dual": (m & stats.get("dual", False)).astype(dt),
            "ratio": jnp.where(m, r_sg, zero), "neg_log_ratio": jnp.where(m, -sg(d), zero),
            "nonfinite": nonfinite.astype(dt)}
    mins, maxs = {"ratio": jnp.where(m, r_sg, jnp.inf)}, {"ratio": jnp.where(m, r_sg, -jnp.inf)}
    if "fkl_weight" in stats:
        w = sg(stats["fkl_weight"])
        sums["fkl_weight"] = jnp.where(m, w, zero)
        mins["fkl_weight"], maxs["fkl_weight"] = jnp.where(m, w, jnp.inf), jnp.where(m, w, -jnp.inf)
    if kl_tok is not None:
        sums["kl"] = jnp.where(m, sg(kl_tok), zero)
    if ent is not None:
        sums["entropy"] = jnp.where(m, sg(ent), zero)
    if w_tis is not None:
        sums["tis_weight"] = w_tis.astype(dt)
        sums["tis_capped"] = (m & (w_tis >= tis_cap)).astype(dt)
    return _partial_reduce(sums, mins, maxs)


# ----------------------------------------------------------------------------------------- the full loss
def policy_loss(logp, old_logp, advantages, mask, *, mode: str = "future_kl", clip_low: float = 0.2,
                clip_high: float = 0.28, clip_ratio_c: float = 3.0, decay_rate: float = 64.0,
                fkl_clip: float = 0.2, fkl_high_only: bool = True, fkl_weight: float = 1.0,
                safety_thresh: float = 6.0, agg: str = "token-mean", ref_logp=None, kl_coef: float = 0.0,
                kl_kind: str = "low_var_kl", entropy=None, entropy_coef: float = 0.0, behavior_logp=None,
                tis_cap: float | None = None):
    """Clipped policy-gradient loss (docs/algorithm.md §1.6); returns ``(loss, metrics)``.

    ``loss_t`` comes from the token loss registered as ``mode`` in ``POLICY_LOSSES`` (module docstring; unknown
    ``mode`` -> ``UnknownNameError``, a ``ValueError``, listing the known ones), called with every mode option
    below. The built-in modes, per valid token (``d_t = clip(lp_t - lp_old_t, -20, 20)``, ``r_t = exp(d_t)``, A the
    advantage, ``k_t = exp(lp_t - sg(lp_t))``: value 1, gradient ``grad log r`` at any log-ratio)::

        L1 = -A r,   L2 = -A clip(r, 1 - clip_low, 1 + clip_high),   Lc = max(L1, L2)
        "ppo":        loss_t = Lc
        "dual_clip":  loss_t = min(-A c, Lc) where A < 0, else Lc              (c = clip_ratio_c > 1)
        "future_kl":  A -> A~ = A (1 + fkl_weight * w_t) with w = future_kl_weights(...) (no gradient),
                      then the dual clip with A~; rows with more than one *lower-dual-clipped* token
                      (A~ < 0 and Lc > -A~ c) are dropped from the mask
        "aepo":       the dual clip, with L2's high clip replaced by the stop-gradient version of AEPO
                      (Dong et al. 2025, arXiv 2510.14545, "entropy clipping-balanced"): where
                      r > 1 + clip_high the clipped ratio is ``(1 + clip_high) k``. Its value is
                      the clipped value, but the gradient is kept and rescaled: for A > 0 and
                      r > 1 + clip_high the token contributes ``-A (1 + clip_high) grad log pi`` instead of 0.
                      The low clip and the dual clip are unchanged.
        "gppo":       GPPO (Klear-Reasoner, Su et al. 2025, arXiv 2508.07629), gradient-preserving clipping on
                      both sides: ``loss_t = -A q`` with ``q = (1 + clip_high) k`` where A > 0 and
                      r > 1 + clip_high, ``q = (1 - clip_low) k`` where A < 0 and r < 1 - clip_low,
                      else ``q = r`` (the value of the PPO clip; a clipped token's gradient is
                      ``-A (1 +- eps) grad log pi`` even beyond the ±20 guard; no dual clip).
        "cispo":      CISPO (MiniMax-M1, arXiv 2506.13585): ``loss_t = -sg(min(r, 1 + clip_high)) A lp``, the
                      importance weight clipped from above only and detached; no token is dropped.

    With ``tis_cap = C`` (off by default: None) each ``loss_t`` is multiplied by the truncated importance weight
    ``w_t = sg(min(exp(lp_old_t - behavior_logp_t), C))`` of :func:`tis_weights` (the sampler / trainer
    mismatch correction; ``behavior_logp`` required; a non-finite one removes the token like any other input).

    Then ``loss = aggregate(loss_t, m, agg) + kl_coef * aggregate(kl_penalty(logp, ref_logp, kl_kind), m,
    agg) - entropy_coef * aggregate(entropy, m, agg)`` where m is the final mask (after the non-finite
    removal and the row drop). ``kl_coef`` (APPO config default 0.001) needs ``ref_logp``; ``entropy_coef``
    needs ``entropy`` (current-policy per-token entropy, differentiable).

    Metrics (float32 scalars, over the valid tokens *before* the row drop unless said otherwise):
    ``clip_frac_low`` (A < 0, r < 1 - clip_low), ``clip_frac_high`` (A > 0, r > 1 + clip_high; A the given
    advantage), ``clip_frac_dual`` (the token loss's ``stats["dual"]``; 0 for "ppo"), ``ratio_mean/min/max``,
    ``approx_kl`` (mean of lp_old - lp), ``fkl_weight_mean/min/max`` (``stats["fkl_weight"]``: 0 unless mode
    "future_kl"), ``kl`` (mean KL
    penalty, 0 without ref_logp), ``entropy`` (mean, 0 without entropy), ``tis_weight_mean`` / ``tis_capped_frac``
    (mean w_t and the share of tokens at the cap; 0 without ``tis_cap``), ``dropped_row_frac`` (dropped rows
    / rows with a valid token), ``valid_tokens`` (final mask), ``nonfinite_tokens``, ``pg_loss``, ``loss``.
    Zero-valued statistics where nothing is valid. Unknown mode / agg / kl_kind -> ``ValueError``.
    """
    token_loss = POLICY_LOSSES.get(mode)
    _check_options(agg, kl_kind, kl_coef, ref_logp, entropy_coef, entropy, tis_cap, behavior_logp)
    lp, old, adv, m, nonfinite, ref, ent, beh = _sanitise(logp, old_logp, advantages, mask, ref_logp, entropy,
                                                          behavior_logp if tis_cap is not None else None)
    ref = None if ref is None else jax.lax.stop_gradient(ref)
    tok, stats = token_loss(lp, old, adv, m, clip_low=clip_low, clip_high=clip_high, clip_ratio_c=clip_ratio_c,
                            decay_rate=decay_rate, fkl_clip=fkl_clip, fkl_high_only=fkl_high_only,
                            fkl_weight=fkl_weight, safety_thresh=safety_thresh)
    w_tis = None
    if tis_cap is not None:
        w_tis = tis_weights(old, beh, m, tis_cap)
        tok = tok * w_tis
    kl_tok = None if ref is None else kl_penalty(lp, ref, kl_kind)
    parts = _loss_statistics(lp, old, adv, m, nonfinite, stats, kl_tok, ent, w_tis, clip_low=clip_low,
                             clip_high=clip_high, tis_cap=tis_cap)
    dropped = jnp.broadcast_to(stats.get("drop_rows", False), m.shape[:1])
    final = m & ~dropped[:, None]

    pg = aggregate(tok, final, agg)
    loss = pg
    if ref is not None:
        loss = loss + kl_coef * aggregate(kl_tok, final, agg)
    if ent is not None:
        loss = loss - entropy_coef * aggregate(ent, final, agg)
    return loss, loss_metrics(parts, dropped, loss, pg)
