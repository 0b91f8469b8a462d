"""Cold-start SFT on tool-use traces: next-token cross-entropy on the *generated* tokens only.

An example is ``{"messages": chat prompt, "segments": [{"text", "generated"}, ...]}`` (or ``"response"``: one
text whose ``<result>\\n...\\n</result>`` blocks are the observations, see :func:`split_response`). Each segment
is tokenised on its own, the way the agent loop builds a rollout (generated text, then the observation tokens
``encode(<result>...)``), so the model learns the token boundaries it will meet in RL. The loss is

    L = - sum_{n,t} g_{n,t} log pi(a_{n,t} | s_{n,t}) / sum_{n,t} g_{n,t}

with g the generated-token mask (prompt, observation and padding tokens excluded), computed with the chunked
log-probs of :mod:`appo_jax.models.logprobs`.

A run's cold start (`cold_start_sft`): the demonstrations (`sft_examples`), AdamW at ``sft.lr`` with the run's
other optimizer settings (`sft_optimizer`), optional held-out probes as SFT goes, and a cache of the result
under a key of exactly what it depends on (`sft_cache_key`: model, tokenizer, task code and options, SFT
settings and seed; not the RL settings), shared by every run with that key.
"""
from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import math
import os
import re
import time
from pathlib import Path
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax

from appo_jax.data import get_task
from appo_jax.data.encoding import encode_prompt
from appo_jax.models.config import ModelConfig
from appo_jax.models.logprobs import token_logprobs
from appo_jax.progress import progress_bar
from appo_jax.training.build import TrainingError
from appo_jax.training.config import OptimizerSection
from appo_jax.training.state import TrainState, make_optimizer
from appo_jax.training.train_step import init_train_state

_RESULT = re.compile(r"<result>\n.*?\n</result>", re.S)


def split_response(response: str) -> list[dict]:
    """Segments of a response text: ``<result>\\n...\\n</result>`` blocks are observations, the rest generated."""
    segments, pos = [], 0
    for m in _RESULT.finditer(response):
        if m.start() > pos:
            segments.append({"text": response[pos:m.start()], "generated": True})
        segments.append({"text": m.group(0), "generated": False})
        pos = m.end()
    if pos < len(response):
        segments.append({"text": response[pos:], "generated": True})
    return segments


def load_sft_examples(path: str | Path) -> list[dict]:
    """Examples from a JSONL file of ``{"messages", "segments"}`` or ``{"messages", "response"}`` objects."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"SFT data file {str(path)!r} does not exist")
    out = []
    with path.open() as f:
        for i, line in enumerate(f, 1):
            if not line.strip():
                continue
            ex = json.loads(line)
            if "messages" not in ex or not ("segments" in ex or "response" in ex):
                raise ValueError(f"{path}:{i}: an SFT example needs 'messages' and 'segments' or 'response'")
            if "segments" not in ex:
                ex = {"messages": ex["messages"], "segments": split_response(ex["response"])}
            out.append(ex)
    return out


def encode_examples(examples: Sequence[dict], tokenizer, *, max_prompt_len: int, max_response_len: int,
                    pad_id: int = 0) -> dict:
    """Arrays of the examples: ``prompt_tokens`` / ``prompt_mask`` ``[N, P]`` (left-padded), ``tokens`` /
    ``gen_mask`` / ``obs_mask`` ``[N, L]``. Prompts over ``max_prompt_len`` raise; responses are truncated to
    ``max_response_len`` tokens."""
    n, p, length = len(examples), max_prompt_len, max_response_len
    out = dict(prompt_tokens=np.full((n, p), pad_id, np.int32), prompt_mask=np.zeros((n, p), bool),
               tokens=np.full((n, length), pad_id, np.int32), gen_mask=np.zeros((n, length), bool),
               obs_mask=np.zeros((n, length), bool))
    for i, ex in enumerate(examples):
        ids = encode_prompt(tokenizer, ex["messages"])
        if len(ids) > p:
            raise ValueError(f"SFT example {i}: prompt has {len(ids)} tokens > max_prompt_len {p}")
        out["prompt_tokens"][i, p - len(ids):] = ids
        out["prompt_mask"][i, p - len(ids):] = True
        t = 0
        for seg in ex["segments"]:
            seg_ids = tokenizer.encode(seg["text"], add_special_tokens=False)[:max(length - t, 0)]
            k = len(seg_ids)
            out["tokens"][i, t:t + k] = seg_ids
            (out["gen_mask"] if seg["generated"] else out["obs_mask"])[i, t:t + k] = True
            t += k
    return out


def sft_loss(params, batch: dict, *, config: ModelConfig, chunk: int = 512):
    """(loss, token count) of the module docstring for one batch dict of :func:`encode_examples`."""
    lp, _ = token_logprobs(params, batch["prompt_tokens"], batch["prompt_mask"], batch["tokens"],
                           batch["gen_mask"] | batch["obs_mask"], config=config, chunk=chunk)
    g = batch["gen_mask"]
    count = jnp.sum(g, dtype=jnp.float32)
    return -jnp.sum(jnp.where(g, lp, 0.0)) / jnp.maximum(count, 1.0), count


def make_sft_step(config: ModelConfig, chunk: int = 512, out_shardings=None):
    """Jitted ``(state, batch) -> (state, {"sft/loss", "sft/tokens", "sft/grad_norm"})`` (state donated); equal
    settings share one jitted function (no compile per call)."""
    key = None
    if out_shardings is not None:
        leaves, treedef = jax.tree.flatten(out_shardings)
        key = (treedef, tuple(leaves))
    return _sft_step(config, int(chunk), key)


@functools.lru_cache(maxsize=16)
def _sft_step(config: ModelConfig, chunk: int, shardings_key):
    def sft_step(state: TrainState, batch: dict):
        (loss, count), grads = jax.value_and_grad(sft_loss, has_aux=True)(state.params, batch, config=config,
                                                                            chunk=chunk)
        state = state.apply_gradients(grads)
        return state, {"sft/loss": loss, "sft/tokens": count, "sft/grad_norm": optax.tree.norm(grads)}

    out = None if shardings_key is None else (jax.tree.unflatten(shardings_key[0], shardings_key[1]), None)
    return jax.jit(sft_step, donate_argnums=0, out_shardings=out)


def sft_batches(arrays: dict, batch_size: int, seed: int = 0):
    """Endless shuffled batches (dicts of ``batch_size`` rows) of the encoded examples; epoch e uses the
    permutation ``default_rng([seed, e])``."""
    n = arrays["tokens"].shape[0]
    if batch_size > n:
        raise ValueError(f"SFT batch size {batch_size} exceeds the {n} examples")
    epoch = 0
    while True:
        order = np.random.default_rng([seed, epoch]).permutation(n)
        for s in range(0, n - batch_size + 1, batch_size):
            idx = order[s:s + batch_size]
            yield {k: v[idx] for k, v in arrays.items()}
        epoch += 1


def sft_optimizer(rl_optimizer: OptimizerSection, lr: float) -> OptimizerSection:
    """The SFT optimizer: the run's AdamW settings (betas, eps, weight decay, clipping) at the constant rate
    ``lr`` (``sft.lr``) without warmup."""
    return dataclasses.replace(rl_optimizer, lr=lr, schedule="constant", warmup_steps=0, min_lr_ratio=0.0)


def tokenizer_fingerprint(tokenizer) -> str:
    """A hash of the tokenizer's whole definition (the ``tokenizers`` JSON of a fast tokenizer: vocabulary, merges,
    pre-tokenizer, special tokens), else of its vocabulary."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    text = backend.to_str() if backend is not None else json.dumps(sorted(tokenizer.get_vocab().items()))
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def sft_cache_key(cfg, tokenizer, task, task_options, seed: int) -> str:
    """The hash under which an SFT result is cached: everything the SFT policy depends on and nothing else — the
    model (architecture source, dtypes, init seed), the tokenizer (`tokenizer_fingerprint`), the data (a
    generated task's `Task.fingerprint` with its options, or the bytes of the JSONL file), the system prompt and
    prompt length the examples are encoded with, the SFT section (steps, examples, batch, lr, lengths), the SFT
    optimizer (`sft_optimizer`) and the SFT seed. The RL settings (algorithm, RL learning rate, steps, ...) are not
    in it, so runs that differ only there share one SFT policy."""
    m, s = cfg.model, cfg.sft
    if task is not None:
        data = {"task": task.name, "fingerprint": task.fingerprint(task_options)}
    else:
        data = {"file": hashlib.sha256(Path(s.data).read_bytes()).hexdigest()[:16]}
    key = {"model": {"name": m.name, "dtype": m.dtype, "param_dtype": m.param_dtype, "init_seed": m.init_seed},
           "tokenizer": tokenizer_fingerprint(tokenizer), "data": data,
           "system_prompt": cfg.data.system_prompt, "max_prompt_len": cfg.rollout.max_prompt_len,
           "sft": {k: v for k, v in dataclasses.asdict(s).items() if k not in ("cache_dir", "eval_every", "seed")},
           "optimizer": dataclasses.asdict(sft_optimizer(cfg.optimizer, s.lr)), "seed": int(seed)}
    return hashlib.sha256(json.dumps(key, sort_keys=True, default=str).encode()).hexdigest()[:16]


# ------------------------------------------------------------------------------- cold-start SFT of a run
def sft_seed(cfg) -> int:
    """The seed of the SFT examples and batches: ``sft.seed``, or the run's ``data.seed`` when it is -1."""
    return cfg.sft.seed if cfg.sft.seed >= 0 else cfg.data.seed


def sft_examples(run) -> list[dict]:
    """The demonstrations of ``run.cfg.sft``: a generated task's traces (made with the run's tools; the run's task
    options when it is the training task) or the examples of a JSONL file; the system prompt replaced when
    ``data.system_prompt`` is set."""
    s, data = run.cfg.sft, run.cfg.data
    task = get_task(s.data)
    if task is None:
        examples = load_sft_examples(s.data)
    else:
        options = data.task_options if task is run.task else None
        seed = sft_seed(run.cfg)
        examples = task.traces(task.records(task.splits[0], s.examples, seed + 1000, options), run.tools, options,
                               seed=seed)
    if data.system_prompt:
        for ex in examples:
            if ex["messages"] and ex["messages"][0]["role"] == "system":
                ex["messages"][0] = {"role": "system", "content": data.system_prompt}
    return examples


def sft_cache_file(run) -> Path | None:
    """``<sft.cache_dir>/sft-<key>.npz`` with the key of `sft_cache_key`, or None without a cache dir."""
    c = run.cfg
    if not c.sft.cache_dir:
        return None
    task = get_task(c.sft.data)
    key = sft_cache_key(c, run.tokenizer, task, c.data.task_options if task is run.task else None, sft_seed(c))
    return Path(c.sft.cache_dir) / f"sft-{key}.npz"


def cold_start_sft(run, params, log, probe=None) -> tuple[Any, list[float]]:
    """``(SFT params, losses)`` of ``run.cfg.sft`` from ``params``: read from the cache when it holds this key
    (`sft_cache_file`), else trained (``sft.steps`` AdamW steps of `make_sft_step`; ``probe(step, losses,
    params)`` every ``sft.eval_every`` steps and after the last) and written to the cache (process 0; atomic)."""
    s = run.cfg.sft
    cache = sft_cache_file(run)
    if cache is not None and cache.is_file():
        with np.load(cache) as f:
            losses = [float(x) for x in f["__losses__"]]
            leaves = [f[f"leaf_{i}"] for i in range(len(jax.tree.leaves(params)))]
        log(f"cold-start SFT: reusing {cache} (loss {losses[0]:.4f} -> {losses[-1]:.4f})")
        return jax.tree.unflatten(jax.tree.structure(params), [jnp.asarray(x) for x in leaves]), losses
    examples = sft_examples(run)
    arrays = encode_examples(examples, run.tokenizer, max_prompt_len=run.cfg.rollout.max_prompt_len,
                             max_response_len=s.max_response_len, pad_id=run.engine.pad_id)
    state, shardings = init_train_state(params, make_optimizer(sft_optimizer(run.cfg.optimizer, s.lr), s.steps),
                                        sft_seed(run.cfg), mesh=run.mesh, model_config=run.model_config)
    step = make_sft_step(run.model_config, run.cfg.train.logprob_chunk, shardings)
    batch_size = min(s.batch_size, len(examples))
    batches = sft_batches(arrays, batch_size, seed=sft_seed(run.cfg))
    log(f"cold-start SFT: {s.steps} steps x {batch_size} of {len(examples)} examples ({s.data}), lr {s.lr:g}, "
        f"responses <= {s.max_response_len} tokens")
    losses, tokens, t0 = [], 0.0, time.perf_counter()
    with progress_bar(s.steps, "sft", "step", enabled=run.cfg.logging.progress) as bar:
        for i in range(s.steps):
            with run.placement.context():
                state, m = step(state, run.placement.tree(next(batches)))
            losses.append(float(m["sft/loss"]))
            if not math.isfinite(losses[-1]):
                raise TrainingError(f"SFT loss became non-finite at SFT step {i + 1}; nothing was saved")
            tokens += float(m["sft/tokens"])
            if probe is not None and s.eval_every and ((i + 1) % s.eval_every == 0 or i + 1 == s.steps):
                probe(i + 1, losses, state.params)
            bar.set_postfix_str(f"loss {losses[-1]:.4f}, {tokens / (time.perf_counter() - t0):.0f} tok/s",
                                refresh=False)
            bar.update(1)
    log(f"cold-start SFT loss: {losses[0]:.4f} -> {losses[-1]:.4f}")
    if cache is not None:
        leaves = {f"leaf_{i}": x for i, x in enumerate(run.placement.host(jax.tree.leaves(state.params)))}
        if run.primary:
            cache.parent.mkdir(parents=True, exist_ok=True)
            tmp = cache.with_name(cache.stem + f".tmp{os.getpid()}.npz")
            np.savez(tmp, __losses__=np.asarray(losses), **leaves)
            os.replace(tmp, cache)  # atomic: concurrent runs never read half a file
    return state.params, losses
