"""The jitted slot sampler: token-in / token-out generation with per-token behaviour log-prob and exact entropy.

A `Sampler` owns ``num_slots`` generation slots, the rows of one KV cache of ``max_len`` slots per row. Each slot
holds a token sequence ``seq`` (prompt, generated tokens, appended tool results, ...). Invariant between calls:
the cache holds ``seq[:-1]`` (the RoPE position of token i is i: padding never counts) and the last token
``seq[-1]`` is *pending*: the next decode step feeds it and samples from the logits it produces. Hence

* ``start(slots, prefixes, keys)`` resets rows and prefills ``prefix[:-1]`` (any token prefix: a prompt, or a
  branch's ``prompt + response[: t + 1]``);
* ``fork(slots, snapshot, rows, prefixes, keys)`` starts slots like ``start`` but copies ``prefix[:-1]``'s KV from
  rows of a :class:`CacheSnapshot` (``snapshot()``: a copy of the cache, e.g. after the initial rollouts; or
  ``live()``: the cache as it is, no copy, e.g. a rollout still running in its slot) that hold exactly those
  tokens, instead of prefilling them: a branch shares its parent's prefix;
* ``append(slots, tokens)`` puts external tokens (tool results) into a slot's context: it forwards
  ``[pending] + tokens[:-1]``, nothing is sampled or recorded;
* ``decode(active, max_new)`` runs an on-device `lax.while_loop` of at most ``decode_chunk`` steps per call over
  all rows (inactive / finished rows have ``token_mask = False`` and do not move, see `appo_jax.models.decoder.forward`), repeated
  from the host until each active slot has ``max_new`` new tokens or stopped; ``decode(..., sampling=p)`` uses
  SamplingParams ``p`` instead of the sampler's own for that call (one compiled decode program per distinct p);
* rolling back ``d`` tokens is ``end -= d`` plus invalidating the slots past the new end: no recomputation.

Attention cost is kept proportional to the slots in use, not to ``max_len``: each jitted call works on the
first W slots of the cache rows (W a power of two covering every writing row's end plus its new tokens; the
slots beyond W are left untouched, rows beyond W only idle in that call).

Prefill is chunked: a batch of rows is left-padded to a common length and forwarded in pieces of
``prefill_chunk`` tokens, the first piece rounded up to a power of two (>= 16) (`prefill_pieces`); a row with no
real token in a piece does not move, so a row uses the cache slots of the pieces it has tokens in, padding
included. Subsets of rows are gathered from the cache, run, and scattered back, so filling one slot costs one
row.

Stopping, checked per slot: EOS ids (on device, the EOS token is kept as the last new token); stop strings (on
the host between device chunks: the slot's text generated since its last start/append is decoded with
``detokenize`` and searched; the kept tokens end with the token that completes the stop string — any text that
token carries after the stop string stays — and the overshoot tokens of that chunk are dropped and rolled back,
so the cache equals a cache that never saw them); ``max_new``; a full cache row (CHUNK_LENGTH).

Randomness: the token at sequence index p of a slot is drawn with ``fold_in(slot_key, p)``, so it depends only on
the slot's key and its context length, not on other slots or on how the calls were chunked: continuing a slot
started from ``prompt + generated[:k]`` with the same key reproduces the from-scratch generation.

What is recorded per generated token (log-prob of the chosen token and the full-vocabulary entropy, float32, of
softmax(logits / T); T = 1 for greedy; top-k / top-p only restrict the draw): see `appo_jax.rollout.sampling`.
With a repetition penalty (``SamplingParams.repetition_penalty != 1``, evaluation) the logits are first penalised
for every token in the slot's whole sequence (prefix, generated and appended tokens), as transformers does.
"""
from __future__ import annotations

import dataclasses
import functools
from typing import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from appo_jax.kernels.build import kernel_status
from appo_jax.models.config import ModelConfig
from appo_jax.models.decoder import forward, pack_weights, unstack_layers
from appo_jax.models.kv_cache import KVCache, init_cache
from appo_jax.models.sharding import cache_shardings
from appo_jax.rollout.sampling import SamplingParams, select_tokens
from appo_jax.protocol import stop_lookback

# Per-slot outcome of a `Sampler.decode` call (values shared with `appo_jax.rollout.slots`).
CHUNK_RUNNING = 0  # produced max_new tokens without stopping (or the slot was inactive)
CHUNK_STOP = 1     # the generated text completed a stop string (its last token is the last new token)
CHUNK_EOS = 2      # produced an EOS token (kept as the last new token)
CHUNK_LENGTH = 3   # the slot's cache row is full
FINISH_REASONS = {CHUNK_RUNNING: "length", CHUNK_STOP: "stop", CHUNK_EOS: "eos", CHUNK_LENGTH: "length"}

_MIN_PREFILL_BUCKET = 16


@dataclasses.dataclass
class DecodeChunk:
    """Result of one `Sampler.decode` call over ``S`` slots: ``tokens`` int32 ``[S, K]``, ``logprobs`` /
    ``entropies`` float32 ``[S, K]`` (K = the largest max_new of the call); the first ``num_new[s]`` entries of
    row s are its new tokens, the rest is 0. ``finish`` int32 ``[S]`` holds CHUNK_* codes."""

    tokens: np.ndarray
    logprobs: np.ndarray
    entropies: np.ndarray
    num_new: np.ndarray
    finish: np.ndarray


@dataclasses.dataclass
class Generation:
    """One finished generation: generated ``token_ids`` with float32 ``logprobs`` / ``entropies`` (same length)
    and ``finish_reason`` in {"eos", "stop", "length"}."""

    prompt_ids: list[int]
    token_ids: list[int]
    logprobs: np.ndarray
    entropies: np.ndarray
    finish_reason: str


# ----------------------------------------------------------------------------------------------- jitted parts
@functools.partial(jax.jit, donate_argnames=("cache",))
def _reset_rows(cache: KVCache, rows: jax.Array) -> KVCache:
    return cache.reset_rows(rows)


@dataclasses.dataclass(frozen=True)
class CacheSnapshot:
    """A copy of a sampler's KV cache (`Sampler.snapshot`) with, per row, the token sequence it holds (``seqs``:
    the first ``cached[r]`` tokens of ``seqs[r]`` are in the cache) and the weights it was computed with; ``live``:
    the sampler's own cache, not a copy (`Sampler.live`)."""

    cache: KVCache
    seqs: tuple
    cached: np.ndarray
    params_id: int
    live: bool = False

    def cannot_fork(self, row: int, prefix: Sequence[int]) -> str | None:
        """Why a slot cannot start from ``prefix`` by copying row ``row`` (which must hold exactly
        ``prefix[:-1]``), or None when it can."""
        if not len(prefix):
            return "the prefix is empty (it needs at least one token)"
        if not 0 <= row < len(self.seqs) or self.seqs[row] is None:
            return f"row {row} of the snapshot holds no sequence"
        need, held = len(prefix) - 1, int(self.cached[row])
        if need > held:
            return (f"it needs the first {need} tokens of row {row}, which holds {held}: the branch point "
                    f"(position {need - 1}) lies past the row's end")
        source = self.seqs[row]
        pos = next((i for i in range(need) if prefix[i] != source[i]), None)
        if pos is not None:
            return (f"row {row} of the snapshot holds another sequence than the prefix (they differ at position "
                    f"{pos}): its slot was reused before the snapshot")
        return None


def _copy_rows(cache: KVCache, source: KVCache, dst: jax.Array, src: jax.Array, counts: jax.Array) -> KVCache:
    """Rows ``dst[i]`` of ``cache`` := the first ``counts[i]`` real tokens of row ``src[i]`` of ``source`` (read
    before any write): its k / v, its valid slots up to the ``counts[i]``-th one, ``end`` one past that slot
    (``dst`` entries out of range are dropped)."""
    valid = source.valid[src]
    keep = valid & (jnp.cumsum(valid.astype(jnp.int32), axis=1) <= counts[:, None])
    end = jnp.max(jnp.where(keep, jnp.arange(valid.shape[1], dtype=jnp.int32)[None, :] + 1, 0), axis=1)
    return KVCache(k=cache.k.at[:, dst].set(source.k[:, src], mode="drop"),
                   v=cache.v.at[:, dst].set(source.v[:, src], mode="drop"),
                   valid=cache.valid.at[dst].set(keep, mode="drop"),
                   end=cache.end.at[dst].set(end.astype(jnp.int32), mode="drop"))


#: `_copy_rows` from a snapshot's cache, and within the cache itself (a live fork)
_fork_rows = functools.partial(jax.jit, donate_argnames=("cache",))(_copy_rows)
_fork_rows_within = jax.jit(lambda cache, dst, src, counts: _copy_rows(cache, cache, dst, src, counts),
                            donate_argnums=(0,))


@functools.partial(jax.jit, donate_argnames=("cache",))
def _truncate_rows(cache: KVCache, rows: jax.Array, new_end: jax.Array) -> KVCache:
    """Roll rows back to ``new_end`` (bool rows [B], int32 new_end [B]): slots >= new_end become invalid."""
    cut = rows[:, None] & (jnp.arange(cache.max_len, dtype=jnp.int32)[None, :] >= new_end[:, None])
    return cache.replace(valid=cache.valid & ~cut, end=jnp.where(rows, new_end, cache.end).astype(jnp.int32))


def _window(cache: KVCache, window: int) -> KVCache:
    """The first ``window`` slots of every row (static size); rows whose end lies beyond it must not write."""
    if window >= cache.max_len:
        return cache
    return KVCache(k=cache.k[:, :, :window], v=cache.v[:, :, :window], valid=cache.valid[:, :window],
                   end=cache.end)


def _merge_window(cache: KVCache, sub: KVCache, rows=None) -> KVCache:
    """Write ``sub`` (rows ``rows`` of the first sub.max_len slots of ``cache``, all rows if None) back."""
    window = sub.max_len
    if rows is None:
        if window >= cache.max_len:
            return sub
        return KVCache(k=cache.k.at[:, :, :window].set(sub.k), v=cache.v.at[:, :, :window].set(sub.v),
                       valid=cache.valid.at[:, :window].set(sub.valid), end=sub.end)
    return KVCache(
        k=cache.k.at[:, rows, :window].set(sub.k, mode="drop"),
        v=cache.v.at[:, rows, :window].set(sub.v, mode="drop"),
        valid=cache.valid.at[rows, :window].set(sub.valid, mode="drop"),
        end=cache.end.at[rows].set(sub.end, mode="drop"),
    )


@functools.partial(jax.jit, static_argnames=("config", "window"), donate_argnames=("cache",))
def _extend_all(params, cache, tokens, positions, mask, *, config: ModelConfig, window: int) -> KVCache:
    """Write tokens [B, T] (mask False = padding; rows without a real token stay put) into the cache; attention
    runs over the first ``window`` slots (every writing row has end + T <= window)."""
    _, sub = forward(params, tokens, positions, config=config, token_mask=mask, cache=_window(cache, window),
                     return_hidden=True)
    return _merge_window(cache, sub)


@functools.partial(jax.jit, static_argnames=("config", "window"), donate_argnames=("cache",))
def _extend_rows(params, cache, rows, tokens, positions, mask, *, config: ModelConfig, window: int) -> KVCache:
    """`_extend_all` on the cache rows ``rows`` [R] only (gather, forward, scatter); row ids >= B are padding
    (their writes are dropped)."""
    part = _window(cache, window)
    sub = KVCache(k=jnp.take(part.k, rows, axis=1, mode="clip"), v=jnp.take(part.v, rows, axis=1, mode="clip"),
                  valid=jnp.take(part.valid, rows, axis=0, mode="clip"),
                  end=jnp.take(part.end, rows, axis=0, mode="clip"))
    _, sub = forward(params, tokens, positions, config=config, token_mask=mask, cache=sub, return_hidden=True)
    return _merge_window(cache, sub, rows)


def _decode_steps(params, cache, keys, tokens, positions, budget, seen, *, config: ModelConfig,
                  sampling: SamplingParams, eos_ids: tuple[int, ...], num_steps: int):
    """Up to ``num_steps`` decode steps for all rows of ``cache`` (already cut to the attention window), on device.

    Row b runs while its count n_b < budget[b] and it has not produced an EOS id: each step feeds its pending
    token ``tokens[b]`` at RoPE position ``positions[b]`` (writing it into the cache) and draws the next token
    with key fold_in(keys[b], positions[b] + 1). Every row with budget > 0 has end + budget <= the cache length.
    ``seen`` (bool [B, V], or None without a repetition penalty)
    marks the tokens of each row's sequence; every drawn token is added to it. Returns (cache, out_tokens int32
    [B, num_steps], out_logprobs, out_entropies float32 [B, num_steps] (row b's first n_b columns are its new
    tokens), n int32 [B], hit_eos bool [B]).
    """
    batch = tokens.shape[0]
    eos = jnp.asarray(eos_ids, jnp.int32)
    base_keys = jax.random.wrap_key_data(keys)

    def cond(carry):
        return (carry["step"] < num_steps) & jnp.any(carry["running"])

    def body(carry):
        running, step = carry["running"], carry["step"]
        logits, new_cache = forward(params, carry["tok"][:, None], carry["pos"][:, None], config=config,
                                    token_mask=running[:, None], cache=carry["cache"])
        next_pos = carry["pos"] + 1
        step_keys = jax.vmap(jax.random.fold_in)(base_keys, next_pos)
        tok, logp, ent = select_tokens(logits[:, 0], step_keys, sampling, carry["seen"])
        n = carry["n"] + running.astype(jnp.int32)
        is_eos = running & jnp.any(tok[:, None] == eos[None, :], axis=-1) if eos_ids else jnp.zeros_like(running)

        def put(buf, value):
            column = jnp.where(running, value, jnp.zeros_like(value))
            return jax.lax.dynamic_update_slice_in_dim(buf, column[:, None].astype(buf.dtype), step, axis=1)

        return {
            "step": step + 1,
            "cache": new_cache,
            "tok": jnp.where(running, tok, carry["tok"]),
            "pos": jnp.where(running, next_pos, carry["pos"]),
            "n": n,
            "running": running & ~is_eos & (n < budget),
            "eos": carry["eos"] | is_eos,
            "out_tok": put(carry["out_tok"], tok),
            "out_lp": put(carry["out_lp"], logp),
            "out_ent": put(carry["out_ent"], ent),
            "seen": None if carry["seen"] is None else carry["seen"].at[jnp.arange(batch), tok].set(
                carry["seen"][jnp.arange(batch), tok] | running),
        }

    init = {
        "step": jnp.int32(0),
        "cache": cache,
        "tok": tokens,
        "pos": positions,
        "n": jnp.zeros((batch,), jnp.int32),
        "running": budget > 0,
        "eos": jnp.zeros((batch,), jnp.bool_),
        "out_tok": jnp.zeros((batch, num_steps), jnp.int32),
        "out_lp": jnp.zeros((batch, num_steps), jnp.float32),
        "out_ent": jnp.zeros((batch, num_steps), jnp.float32),
        "seen": seen,
    }
    out = jax.lax.while_loop(cond, body, init)
    return out["cache"], out["out_tok"], out["out_lp"], out["out_ent"], out["n"], out["eos"]


_DECODE_STATIC = ("config", "sampling", "eos_ids", "num_steps", "window")


@functools.partial(jax.jit, static_argnames=_DECODE_STATIC, donate_argnames=("cache",))
def _decode_all(params, cache, keys, tokens, positions, budget, seen, *, config: ModelConfig,
                sampling: SamplingParams, eos_ids: tuple[int, ...], num_steps: int, window: int):
    """`_decode_steps` over every cache row; attention over the first ``window`` slots (every row with budget > 0
    has end + budget <= window)."""
    sub, *outs = _decode_steps(params, _window(cache, window), keys, tokens, positions, budget, seen, config=config,
                               sampling=sampling, eos_ids=eos_ids, num_steps=num_steps)
    return (_merge_window(cache, sub), *outs)


@functools.partial(jax.jit, static_argnames=_DECODE_STATIC, donate_argnames=("cache",))
def _decode_rows(params, cache, rows, keys, tokens, positions, budget, seen, *, config: ModelConfig,
                 sampling: SamplingParams, eos_ids: tuple[int, ...], num_steps: int, window: int):
    """`_decode_all` on the cache rows ``rows`` [R] only (gather the window of those rows, decode, scatter back;
    row ids >= B are padding rows with budget 0 whose writes are dropped). The per-row inputs are [R]-sized."""
    part = _window(cache, window)
    sub = KVCache(k=jnp.take(part.k, rows, axis=1, mode="clip"), v=jnp.take(part.v, rows, axis=1, mode="clip"),
                  valid=jnp.take(part.valid, rows, axis=0, mode="clip"),
                  end=jnp.take(part.end, rows, axis=0, mode="clip"))
    sub, *outs = _decode_steps(params, sub, keys, tokens, positions, budget, seen, config=config, sampling=sampling,
                               eos_ids=eos_ids, num_steps=num_steps)
    return (_merge_window(cache, sub, rows), *outs)


# ------------------------------------------------------------------------------------------------ host helpers
def _cpu_kernels_status(config: ModelConfig, params, mesh: jax.sharding.Mesh | None) -> tuple[bool, str]:
    """Whether a sampler for ``config`` with ``params`` on ``mesh`` can use the CPU kernel (`Sampler`'s
    ``cpu_kernels``)."""
    if config.dtype != "float32" or config.param_dtype not in ("float32", "bfloat16"):
        return False, (f"the sampler computes in {config.dtype} with {config.param_dtype} weights, not float32 "
                       "with float32 or bfloat16 weights")
    if mesh is not None and mesh.size > 1:
        return False, f"the sampler is sharded over {mesh.size} devices"
    devices = {d for leaf in jax.tree.leaves(params) for d in getattr(leaf, "devices", lambda: set())()}
    if len(devices) > 1:
        return False, f"the weights are spread over {len(devices)} devices"
    return kernel_status()


_packed_weights = jax.jit(pack_weights, static_argnums=1)


def _pow2_at_least(n: int) -> int:
    return 1 << max(0, int(n) - 1).bit_length()


def prefill_pieces(num_tokens: int, prefill_chunk: int) -> list[int]:
    """Piece lengths used to prefill ``num_tokens`` (left-padded) tokens: the remainder first, rounded up to a
    power of two in [16, prefill_chunk], then full ``prefill_chunk`` pieces. [] for 0 tokens."""
    full, rest = divmod(int(num_tokens), prefill_chunk)
    first = [min(prefill_chunk, _pow2_at_least(max(rest, _MIN_PREFILL_BUCKET)))] if rest else []
    return first + [prefill_chunk] * full


def _slots_consumed(num_tokens: int, pieces: Sequence[int]) -> int:
    """Cache slots a row with ``num_tokens`` right-aligned real tokens uses: every piece it has a token in."""
    total, used, col = sum(pieces), 0, 0
    for length in pieces:
        if col + length > total - num_tokens and num_tokens > 0:
            used += length
        col += length
    return used


def _key_data(key) -> np.ndarray:
    """uint32 [2] data of a threefry PRNG key (typed `jax.random.key` or raw `jax.random.PRNGKey`)."""
    arr = key
    if hasattr(arr, "dtype") and jax.dtypes.issubdtype(arr.dtype, jax.dtypes.prng_key):
        arr = jax.random.key_data(arr)
    data = np.asarray(arr)
    if data.shape != (2,) or data.dtype != np.uint32:
        raise ValueError(
            f"a slot key must be one threefry PRNG key (jax.random.key(s) or jax.random.PRNGKey(s)); got an array "
            f"of shape {data.shape} and dtype {data.dtype}"
        )
    return data


# ------------------------------------------------------------------------------------------------------ Sampler
class Sampler:
    """Slot-batched sampler over one KV cache (module doc). Not thread-safe; one caller drives it.

    Args: model ``config`` and ``params`` (plain pytree, possibly sharded); ``num_slots`` rows; ``max_len``
    cache slots per row (prompt + generated + appended tokens + prefill padding must fit); ``sampling``;
    ``stop_strings`` (need ``detokenize``: list of ids -> str); ``eos_token_ids`` (default config's);
    ``decode_chunk`` device steps per `lax.while_loop` call; ``prefill_chunk`` tokens per prefill piece;
    ``min_attention_window``: each call attends over only the first W slots of the rows, W the smallest power of
    two >= this (and >= the slots the call's writing rows can reach), or the whole row (None: always the whole
    row). W is a static shape: at most log2(max_len / min_attention_window) + 1 compiled variants per function.
    ``mesh``: place the cache with `appo_jax.models.sharding.cache_shardings` (rows over data x fsdp, kv heads
    over tensor where they divide); params are used as given (e.g. from ``load_model(..., mesh=mesh)``).
    ``unstack_weights``: keep an unstacked copy of the weights (`appo_jax.models.decoder.unstack_layers`): XLA's
    CPU backend copies every slice of a stacked weight before its dot, so on CPU decode steps are 7-21% faster
    (benchmarks/sampler_layouts.py), at about 4.5 s more compile time per program variant for SmolLM2's 30
    layers (an unrolled forward); off by default.
    ``cpu_kernels``: decode steps run in the C++ kernels of `appo_jax.kernels` (``ModelConfig.cpu_kernels``): the
    sampler keeps its weights packed as column panels (`appo_jax.models.decoder.pack_weights`, unstacked; products
    of up to `appo_jax.kernels.cpu_matmul.KERNEL_MAX_ROWS` rows by the panel kernel, larger ones by XLA's dot over
    the panels) and one-token steps attend over the cache in place (`appo_jax.kernels.cpu_attention`), when the
    kernels are built, the sampler computes in float32 (with float32 weights, or bfloat16 ones:
    ``param_dtype="bfloat16"``, half the bytes a step reads) and is not sharded over several devices;
    ``cpu_kernels_status`` says whether they are used and why not. Results agree with XLA to float32 rounding.
    """

    def __init__(self, config: ModelConfig, params, *, num_slots: int, max_len: int,
                 sampling: SamplingParams = SamplingParams(), stop_strings: Sequence[str] = (),
                 detokenize: Callable[[list[int]], str] | None = None,
                 eos_token_ids: Sequence[int] | None = None, decode_chunk: int = 32, prefill_chunk: int = 512,
                 min_attention_window: int | None = 256, mesh: jax.sharding.Mesh | None = None,
                 unstack_weights: bool = False, cpu_kernels: bool = False):
        if num_slots < 1:
            raise ValueError(f"Sampler num_slots must be >= 1, got {num_slots}")
        if max_len < 2:
            raise ValueError(f"Sampler max_len must be >= 2, got {max_len}")
        if decode_chunk < 1 or prefill_chunk < 1:
            raise ValueError(f"decode_chunk and prefill_chunk must be >= 1, got {decode_chunk}, {prefill_chunk}")
        if min_attention_window is not None and min_attention_window < 1:
            raise ValueError(f"min_attention_window must be >= 1 or None, got {min_attention_window}")
        if not isinstance(sampling, SamplingParams):
            raise ValueError(f"sampling must be a SamplingParams, got {type(sampling).__name__}")
        stop_strings = tuple(stop_strings)
        if any(not isinstance(s, str) or not s for s in stop_strings):
            raise ValueError(f"stop_strings must be non-empty strings, got {stop_strings!r}")
        if stop_strings and detokenize is None:
            raise ValueError("stop_strings need a detokenize function (token ids -> text)")
        self.cpu_kernels_status = _cpu_kernels_status(config, params, mesh) if cpu_kernels else (False, "not asked for")
        if self.cpu_kernels_status[0]:
            config, unstack_weights = dataclasses.replace(config, cpu_kernels=True), True
        self.config = config
        self._unstack = bool(unstack_weights)
        self.params = self._own_weights(params)
        self.num_slots = int(num_slots)
        self.max_len = int(max_len)
        self.sampling = sampling
        self.stop_strings = stop_strings
        self.detokenize = detokenize
        eos = config.eos_token_ids if eos_token_ids is None else eos_token_ids
        self.eos_token_ids = tuple(int(t) for t in eos)
        self.decode_chunk = int(decode_chunk)
        self.prefill_chunk = int(prefill_chunk)
        self.min_attention_window = min_attention_window
        self._stop_lookback = stop_lookback(stop_strings)  # tokens a stop string can span
        self._cache = init_cache(config, self.num_slots, self.max_len)
        if mesh is not None:
            self._cache = jax.device_put(self._cache, cache_shardings(self._cache, mesh))
        self._keys = np.zeros((self.num_slots, 2), np.uint32)
        self._seq: list[list[int] | None] = [None] * self.num_slots
        self._end = np.zeros(self.num_slots, np.int64)       # host mirror of cache.end
        self._cached = np.zeros(self.num_slots, np.int64)    # real tokens in the cache (= len(seq) - 1)
        self._turn: list[list[int]] = [[] for _ in range(self.num_slots)]  # generated since last start/append
        self._checked = np.zeros(self.num_slots, np.int64)   # turn tokens already searched for stop strings

    # -------------------------------------------------------------------------------------------- inspection
    def set_params(self, params) -> None:
        """Use new policy weights for later calls (same tree structure, shapes and dtypes: no recompile; an
        unstacked copy with ``unstack_weights``, class doc)."""
        self.params = self._own_weights(params)

    def _own_weights(self, params):
        """The sampler's copy of ``params``: floating leaves in ``config.param_dtype`` (cast when they differ, e.g.
        bfloat16 weights from a float32 trainer: ``rollout.weights_dtype``), unstacked with ``unstack_weights``,
        packed into column panels with the CPU kernel (`appo_jax.models.decoder.pack_weights`)."""
        want = self.config.params_dtype
        params = jax.tree.map(lambda x: x.astype(want) if jnp.issubdtype(x.dtype, jnp.floating) and x.dtype != want
                              else x, params)
        if self.config.cpu_kernels:
            return _packed_weights(params, self.config)
        return unstack_layers(params) if self._unstack else params

    def sequence(self, slot: int) -> list[int]:
        """A copy of slot ``slot``'s full token sequence (prefix, generated and appended tokens)."""
        return list(self._require_started(slot))

    def free_cache_slots(self, slot: int) -> int:
        """Cache slots left in row ``slot`` (each generated token uses one)."""
        return int(self.max_len - self._end[self._check_slot(slot)])

    @property
    def cache(self) -> KVCache:
        return self._cache

    # ----------------------------------------------------------------------------------------- start / append
    def start(self, slots: Sequence[int], prefixes: Sequence[Sequence[int]], keys: Sequence) -> None:
        """Reset each slot ``slots[i]`` and fill it with the non-empty token prefix ``prefixes[i]``; its later
        tokens are drawn with the PRNG key ``keys[i]`` (module doc: token at index p uses fold_in(key, p))."""
        slots = self._check_slots(slots, "start")
        if not (len(prefixes) == len(keys) == len(slots)):
            raise ValueError(f"start: got {len(slots)} slots, {len(prefixes)} prefixes and {len(keys)} keys")
        seqs = [self._check_tokens(p, f"start: prefix for slot {s}") for s, p in zip(slots, prefixes)]
        for s, seq in zip(slots, seqs):
            if not seq:
                raise ValueError(f"start: the prefix for slot {s} is empty (it needs at least one token)")
        key_data = [_key_data(k) for k in keys]
        # check capacity before touching any state
        self._plan([len(seq) - 1 for seq in seqs], [0] * len(slots), slots, "start")
        rows = np.zeros(self.num_slots, bool)
        rows[slots] = True
        self._cache = _reset_rows(self._cache, jnp.asarray(rows))
        for s, seq, kd in zip(slots, seqs, key_data):
            self._seq[s] = list(seq)
            self._keys[s] = kd
            self._end[s] = 0
            self._cached[s] = 0
            self._turn[s] = []
            self._checked[s] = 0
        self._fill(slots)

    def snapshot(self) -> CacheSnapshot:
        """A copy of the cache and of each slot's sequence, to :meth:`fork` from later (after the slots have been
        reused): e.g. the initial rollouts' KV rows, which their branches share up to the branch point."""
        return CacheSnapshot(jax.tree.map(jnp.copy, self._cache),
                             tuple(None if q is None else tuple(q) for q in self._seq), self._cached.copy(),
                             id(self.params))

    def live(self) -> CacheSnapshot:
        """The cache and slot sequences as they are now, not copied: :meth:`fork` from it copies rows within the
        cache (a branch of a rollout still running in its slot). It holds until the next call that changes the
        cache; :meth:`fork` refuses it after that."""
        return CacheSnapshot(self._cache, tuple(self._seq), self._cached.copy(), id(self.params), live=True)

    def fork(self, slots: Sequence[int], snapshot: CacheSnapshot, rows: Sequence[int],
             prefixes: Sequence[Sequence[int]], keys: Sequence) -> None:
        """:meth:`start` each slot ``slots[i]`` from ``prefixes[i]`` without prefilling it: its first
        ``len(prefix) - 1`` tokens are copied from row ``rows[i]`` of ``snapshot``, which must hold exactly those
        tokens (the KV of a branch's parent up to the branch point). ``ValueError`` naming the slot, the row and
        the position when the row holds fewer tokens (a branch point past the row's end), other tokens (its slot
        was reused before the snapshot), or when the snapshot was taken with other weights."""
        slots = self._check_slots(slots, "fork")
        if not (len(rows) == len(prefixes) == len(keys) == len(slots)):
            raise ValueError(f"fork: got {len(slots)} slots, {len(rows)} rows, {len(prefixes)} prefixes and "
                             f"{len(keys)} keys")
        if snapshot.params_id != id(self.params):
            raise ValueError("fork: the snapshot was taken with other weights (set_params since); take a new one")
        if snapshot.live and snapshot.cache is not self._cache:
            raise ValueError("fork: the live view is stale (the cache changed since `live()`); take a new one")
        if snapshot.cache.max_len != self.max_len or snapshot.cache.batch != self.num_slots:
            raise ValueError(f"fork: the snapshot's cache is {snapshot.cache.batch} x {snapshot.cache.max_len}, this "
                             f"sampler's {self.num_slots} x {self.max_len}")
        seqs = [self._check_tokens(p, f"fork: prefix for slot {s}") for s, p in zip(slots, prefixes)]
        for s, r, seq in zip(slots, rows, seqs):
            problem = snapshot.cannot_fork(int(r), seq)
            if problem:
                raise ValueError(f"fork: slot {s}: {problem}")
        key_data = [_key_data(k) for k in keys]
        dst = np.asarray(slots, np.int32)
        args = (jnp.asarray(dst), jnp.asarray(np.asarray(rows, np.int32)),
                jnp.asarray(np.array([len(q) - 1 for q in seqs], np.int32)))
        self._cache = (_fork_rows_within(self._cache, *args) if snapshot.live
                       else _fork_rows(self._cache, snapshot.cache, *args))
        ends = np.asarray(jax.device_get(self._cache.end))[dst]
        for s, seq, kd, end in zip(slots, seqs, key_data, ends):
            self._seq[s], self._keys[s] = list(seq), kd
            self._end[s], self._cached[s] = int(end), len(seq) - 1
            self._turn[s], self._checked[s] = [], 0

    def append(self, slots: Sequence[int], tokens: Sequence[Sequence[int]]) -> None:
        """Append ``tokens[i]`` to slot ``slots[i]`` as context (not sampled, nothing recorded). The slot's next
        token is then sampled after them."""
        slots = self._check_slots(slots, "append")
        if len(tokens) != len(slots):
            raise ValueError(f"append: got {len(slots)} slots and {len(tokens)} token lists")
        new = [self._check_tokens(t, f"append: tokens for slot {s}") for s, t in zip(slots, tokens)]
        for s in slots:
            self._require_started(s)
        self._plan([len(self._seq[s]) - 1 + len(t) - self._cached[s] for s, t in zip(slots, new)],
                   [self._end[s] for s in slots], slots, "append")
        for s, t in zip(slots, new):
            self._seq[s].extend(t)
            self._turn[s] = []
            self._checked[s] = 0
        self._fill(slots)

    def _plan(self, lengths: list[int], ends: list[int], slots: list[int], what: str) -> list[int]:
        pieces = prefill_pieces(max(lengths, default=0), self.prefill_chunk)
        for s, n, end in zip(slots, lengths, ends):
            need = end + _slots_consumed(n, pieces)
            if need > self.max_len:
                raise ValueError(
                    f"{what}: slot {s} needs {need} cache slots ({end} used + {n} tokens + prefill padding) but "
                    f"the cache has max_len={self.max_len}; create the Sampler with a larger max_len"
                )
        return pieces

    def _fill(self, slots: list[int]) -> None:
        """Forward each slot's tokens seq[cached:-1] into its cache row, in prefill pieces."""
        todo = [(s, self._seq[s][self._cached[s]: len(self._seq[s]) - 1]) for s in slots]
        todo = [(s, t) for s, t in todo if t]
        if not todo:
            return
        lengths = [len(t) for _, t in todo]
        pieces = self._plan(lengths, [self._end[s] for s, _ in todo], [s for s, _ in todo], "fill")
        total = sum(pieces)
        num_rows = _pow2_at_least(len(todo))
        all_rows = num_rows >= self.num_slots
        height = self.num_slots if all_rows else num_rows
        tokens = np.zeros((height, total), np.int32)
        positions = np.zeros((height, total), np.int32)
        mask = np.zeros((height, total), bool)
        row_ids = np.full(height, self.num_slots, np.int32)  # padding rows: out of range, writes dropped
        for i, (s, t) in enumerate(todo):
            r = s if all_rows else i
            row_ids[r] = s
            tokens[r, total - len(t):] = t
            positions[r, total - len(t):] = np.arange(self._cached[s], self._cached[s] + len(t))
            mask[r, total - len(t):] = True
        window = self.attention_window(max(self._end[s] + _slots_consumed(len(t), pieces) for s, t in todo))
        col = 0
        for length in pieces:
            cols = slice(col, col + length)
            args = (jnp.asarray(tokens[:, cols]), jnp.asarray(positions[:, cols]), jnp.asarray(mask[:, cols]))
            if all_rows:
                self._cache = _extend_all(self.params, self._cache, *args, config=self.config, window=window)
            else:
                self._cache = _extend_rows(self.params, self._cache, jnp.asarray(row_ids), *args,
                                           config=self.config, window=window)
            col += length
        for s, t in todo:
            self._end[s] += _slots_consumed(len(t), pieces)
            self._cached[s] += len(t)

    # ------------------------------------------------------------------------------------------------ decode
    def decode(self, active, max_new, sampling: SamplingParams | None = None) -> DecodeChunk:
        """Generate for the slots with ``active[s]`` (bool [S]) until each has ``max_new[s]`` (int [S] or a
        scalar, >= 1 where active) new tokens or stops at EOS / a stop string / a full cache row (module doc).

        ``sampling`` overrides ``self.sampling`` for this call only (None: ``self.sampling``), e.g. a server that
        decodes groups of slots with different settings from one cache. Each distinct SamplingParams compiles one
        decode program (it is a static argument of the jitted loop)."""
        if sampling is None:
            sampling = self.sampling
        elif not isinstance(sampling, SamplingParams):
            raise ValueError(f"decode: sampling must be a SamplingParams or None, got {type(sampling).__name__}")
        active = np.asarray(active, bool)
        if active.shape != (self.num_slots,):
            raise ValueError(f"decode: active must have shape ({self.num_slots},), got {active.shape}")
        max_new = np.broadcast_to(np.asarray(max_new, np.int64), (self.num_slots,))
        for s in np.flatnonzero(active):
            self._require_started(int(s))
            if max_new[s] < 1:
                raise ValueError(f"decode: max_new for active slot {s} must be >= 1, got {max_new[s]}")
        width = int(max_new[active].max()) if active.any() else 0
        out_tok = np.zeros((self.num_slots, width), np.int32)
        out_lp = np.zeros((self.num_slots, width), np.float32)
        out_ent = np.zeros((self.num_slots, width), np.float32)
        count = np.zeros(self.num_slots, np.int64)
        finish = np.full(self.num_slots, CHUNK_RUNNING, np.int32)
        running = active.copy()
        while True:
            full = running & (self._end >= self.max_len)
            finish[full] = CHUNK_LENGTH
            running &= ~full
            if not running.any():
                break
            budget = np.where(running, np.minimum(np.minimum(max_new - count, self.max_len - self._end),
                                                  self.decode_chunk), 0)
            toks, lps, ents, num, eos = self._decode_chunk(running, budget, sampling)
            rollback = np.zeros(self.num_slots, bool)
            for s in np.flatnonzero(running):
                k, c = int(num[s]), int(count[s])
                new = toks[s, :k].tolist()
                self._seq[s].extend(new)
                self._turn[s].extend(new)
                self._end[s] += k
                self._cached[s] += k
                out_tok[s, c:c + k], out_lp[s, c:c + k], out_ent[s, c:c + k] = toks[s, :k], lps[s, :k], ents[s, :k]
                count[s] += k
                keep = self._find_stop(s)
                if keep is not None:
                    drop = len(self._turn[s]) - keep
                    if drop:
                        del self._seq[s][-drop:], self._turn[s][-drop:]
                        self._end[s] -= drop
                        self._cached[s] -= drop
                        count[s] -= drop
                        out_tok[s, count[s]:], out_lp[s, count[s]:], out_ent[s, count[s]:] = 0, 0, 0
                        rollback[s] = True
                    self._checked[s] = len(self._turn[s])
                    finish[s], running[s] = CHUNK_STOP, False
                elif eos[s]:
                    finish[s], running[s] = CHUNK_EOS, False
                elif count[s] >= max_new[s]:
                    running[s] = False
            if rollback.any():
                self._cache = _truncate_rows(self._cache, jnp.asarray(rollback),
                                             jnp.asarray(self._end, jnp.int32))
        return DecodeChunk(out_tok, out_lp, out_ent, count.astype(np.int32), finish)

    def _decode_chunk(self, running: np.ndarray, budget: np.ndarray, sampling: SamplingParams):
        """One device call of up to ``decode_chunk`` steps with ``sampling`` for the ``running`` slots with
        per-slot ``budget``; host arrays ``(tokens, logprobs, entropies, num_new, hit_eos)`` indexed by slot.

        When at most half the slots run, only their cache rows are decoded (gathered into a batch of R rows, R
        the smallest power of two >= the running count): the step cost then follows the running slots, not
        ``num_slots`` — the long tail of a batch, where a few rollouts are still generating, stays cheap."""
        window = self.attention_window(int((self._end + budget)[running].max()))
        static = dict(config=self.config, sampling=sampling, eos_ids=self.eos_token_ids,
                      num_steps=self.decode_chunk, window=window)
        pending = np.array([seq[-1] if seq else 0 for seq in self._seq], np.int32)
        positions = np.array([len(seq) - 1 if seq else 0 for seq in self._seq], np.int32)
        seen = self._seen_tokens(sampling)
        height = _pow2_at_least(int(running.sum()))
        if 2 * height > self.num_slots:
            self._cache, *outs = _decode_all(self.params, self._cache, jnp.asarray(self._keys),
                                             jnp.asarray(pending), jnp.asarray(positions),
                                             jnp.asarray(budget, jnp.int32), seen, **static)
            return jax.device_get(tuple(outs))
        slots = np.flatnonzero(running)
        rows = np.full(height, self.num_slots, np.int32)  # padding rows: out of range, budget 0, writes dropped
        rows[:len(slots)] = slots
        pick = np.minimum(rows, self.num_slots - 1)
        sub_budget = np.where(rows < self.num_slots, budget[pick], 0).astype(np.int32)
        self._cache, *outs = _decode_rows(self.params, self._cache, jnp.asarray(rows), jnp.asarray(self._keys[pick]),
                                          jnp.asarray(pending[pick]), jnp.asarray(positions[pick]),
                                          jnp.asarray(sub_budget), None if seen is None else seen[pick], **static)
        sub = jax.device_get(tuple(outs))
        full = []
        for x in sub:  # scatter the [R]-row outputs back to slot order
            out = np.zeros((self.num_slots,) + x.shape[1:], x.dtype)
            out[slots] = x[:len(slots)]
            full.append(out)
        return tuple(full)

    def _seen_tokens(self, sampling: SamplingParams) -> np.ndarray | None:
        """bool [S, V]: the tokens in each slot's sequence (for the repetition penalty of ``sampling``; None
        without one). Built from the host sequences at every device chunk, so starts, appends and stop-string
        rollbacks need no device-side bookkeeping."""
        if not sampling.penalizes:
            return None
        seen = np.zeros((self.num_slots, self.config.vocab_size), bool)
        for s, seq in enumerate(self._seq):
            if seq:
                seen[s, seq] = True
        return seen

    def attention_window(self, need: int) -> int:
        """Attention window (static) covering ``need`` slots: a power of two >= min_attention_window, or the
        whole row."""
        if self.min_attention_window is None:
            return self.max_len
        window = max(self.min_attention_window, _pow2_at_least(need))
        return self.max_len if window >= self.max_len else window

    def _find_stop(self, s: int) -> int | None:
        """Smallest j > checked such that the text of turn[:j] completes a stop string that ends after the text
        of turn[:checked]; None if the new tokens complete none (then checked = len(turn))."""
        turn, checked = self._turn[s], int(self._checked[s])
        if not self.stop_strings or len(turn) == checked:
            return None
        lo = max(0, checked - self._stop_lookback)
        old_len = len(self.detokenize(turn[lo:checked])) if checked > lo else 0

        def completes(j: int) -> bool:
            text = self.detokenize(turn[lo:j])
            return any(text.find(stop, max(0, old_len - len(stop) + 1)) >= 0 for stop in self.stop_strings)

        if completes(len(turn)):
            return next(j for j in range(checked + 1, len(turn) + 1) if completes(j))
        self._checked[s] = len(turn)
        return None

    # ------------------------------------------------------------------------------------------------ checks
    def _check_slot(self, slot) -> int:
        if isinstance(slot, bool) or not isinstance(slot, (int, np.integer)) or not 0 <= slot < self.num_slots:
            raise ValueError(f"slot {slot!r} is not in [0, {self.num_slots})")
        return int(slot)

    def _check_slots(self, slots, what: str) -> list[int]:
        slots = [self._check_slot(s) for s in slots]
        if len(set(slots)) != len(slots):
            raise ValueError(f"{what}: slots must be distinct, got {slots}")
        return slots

    def _require_started(self, slot) -> list[int]:
        seq = self._seq[self._check_slot(slot)]
        if seq is None:
            raise ValueError(f"slot {slot} was never started (call Sampler.start first)")
        return seq

    def _check_tokens(self, tokens, what: str) -> list[int]:
        arr = np.asarray(tokens)
        if arr.size and (arr.ndim != 1 or not np.issubdtype(arr.dtype, np.integer)):
            raise ValueError(f"{what} must be a flat sequence of int token ids")
        if arr.size and (arr.min() < 0 or arr.max() >= self.config.vocab_size):
            raise ValueError(f"{what} has token ids outside [0, {self.config.vocab_size})")
        return arr.astype(np.int64).tolist()


# ----------------------------------------------------------------------------------------------------- generate
def cache_len_for(prompt_lens: Sequence[int], max_new_tokens: int, prefill_chunk: int = 512,
                  multiple: int = 64) -> int:
    """Cache slots per row that fit a batch prefill of these prompts plus ``max_new_tokens`` (rounded up to a
    multiple of ``multiple`` so that nearby sizes share compiled code)."""
    pieces = prefill_pieces(max(prompt_lens) - 1, prefill_chunk)
    need = max(_slots_consumed(n - 1, pieces) for n in prompt_lens) + max_new_tokens
    return -(-max(need, 2) // multiple) * multiple


def generate(config: ModelConfig, params, prompts: Sequence[Sequence[int]], *, max_new_tokens: int, key,
             sampling: SamplingParams = SamplingParams(), stop_strings: Sequence[str] = (),
             detokenize: Callable[[list[int]], str] | None = None, eos_token_ids: Sequence[int] | None = None,
             decode_chunk: int = 32, mesh: jax.sharding.Mesh | None = None) -> list[Generation]:
    """Generate for every prompt (non-empty token id lists) in one batch; prompt i uses the slot key
    fold_in(key, i). Returns one `Generation` per prompt."""
    if not prompts:
        raise ValueError("generate: no prompts given")
    if max_new_tokens < 1:
        raise ValueError(f"generate: max_new_tokens must be >= 1, got {max_new_tokens}")
    for i, p in enumerate(prompts):
        if len(p) == 0:
            raise ValueError(f"generate: prompt {i} is empty (it needs at least one token, e.g. BOS)")
    sampler = Sampler(config, params, num_slots=len(prompts),
                      max_len=cache_len_for([len(p) for p in prompts], max_new_tokens),
                      sampling=sampling, stop_strings=stop_strings, detokenize=detokenize,
                      eos_token_ids=eos_token_ids, decode_chunk=decode_chunk, mesh=mesh)
    slots = list(range(len(prompts)))
    sampler.start(slots, prompts, [jax.random.fold_in(key, i) for i in slots])
    out = sampler.decode(np.ones(len(prompts), bool), max_new_tokens)
    return [
        Generation(prompt_ids=list(prompts[i]), token_ids=out.tokens[i, :out.num_new[i]].tolist(),
                   logprobs=out.logprobs[i, :out.num_new[i]].copy(), entropies=out.entropies[i, :out.num_new[i]].copy(),
                   finish_reason=FINISH_REASONS[int(out.finish[i])])
        for i in slots
    ]
