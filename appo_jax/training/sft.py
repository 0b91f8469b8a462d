"""Cold-start SFT on tool-use traces: next-token cross-entropy on the *generated* tokens only.

An example is ``{"messages": chat prompt, "segments": [{"text", "generated"}, ...]}`` (or ``"response"``: one
text whose ``<result>\\n...\\n</result>`` blocks are the observations, see :func:`split_response`). Each segment
is tokenised on its own, the way the agent loop builds a rollout (generated text, then the observation tokens
``encode(<result>...)``), so the model learns the token boundaries it will meet in RL. The loss is

    L = - sum_{n,t} g_{n,t} log pi(a_{n,t} | s_{n,t}) / sum_{n,t} g_{n,t}

with g the generated-token mask (prompt, observation and padding tokens excluded), computed with the chunked
log-probs of :mod:`appo_jax.models.logprobs`.
"""
from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import re
from pathlib import Path
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax

from appo_jax.data.encoding import encode_prompt
from appo_jax.models.config import ModelConfig
from appo_jax.models.logprobs import token_logprobs
from appo_jax.training.config import OptimizerSection
from appo_jax.training.state import TrainState

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
