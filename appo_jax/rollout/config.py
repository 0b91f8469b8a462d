"""`RolloutConfig`: every knob of the sampler and the tool loop, in one place.

The experiment config uses it as its ``rollout`` section as-is (``--set rollout.temperature=0.7``), the trainer,
evaluation and the ``rollout`` CLI hand it to the engine, and `RolloutConfig.fitted` sizes it to one call.
Defaults are the official APPO settings (docs/algorithm.md §1.8) where the paper has one. The knobs of a
rollout *scheme* (ARPO's alpha / beta / beam, AEPO's penalty, Tree-GRPO's rounds) are the algorithm's: they live
in the experiment's ``algorithm`` section and reach the strategy as its typed options
(`appo_jax.rollout.strategies`).
"""
from __future__ import annotations

import dataclasses
import math
from typing import Sequence

from appo_jax.core.branching import ENTROPY_MODES


@dataclasses.dataclass
class RolloutConfig:
    """Rollout settings.

    ``max_prompt_len`` / ``max_response_len``: the static P / L of the Trajectory (L is each rollout's response
    budget, tool results included); ``tool_call_limit``: tool calls allowed per rollout (one more ends it as a
    format failure); ``temperature`` / ``top_p`` / ``top_k`` / ``repetition_penalty``: sampling (top_k 0 and
    repetition_penalty 1 = off; a penalty is for evaluation: training log-probs are recomputed without it);
    ``num_slots``: concurrent sampler slots (0 = one per rollout of a call); ``decode_chunk``: decode steps per
    host check; ``tool_workers`` / ``tool_timeout_s``: the tool pool and the python tool's wall-clock limit;
    ``search_cache``: the search corpus (a query-cache JSON; empty = the shipped one);
    ``probe_len``: generated tokens of a segment whose mean entropy the loop reports to branching hooks (ARPO /
    AEPO, docs/algorithm.md §1.7). ``entropy`` / ``entropy_k``: the
    recorded token entropy H_t: ``exact`` (full vocabulary, default), ``topk`` (renormalised over the k most
    likely tokens) or ``official_topk`` (the official code's, from vLLM's top-k log-probs;
    `appo_jax.core.branching.topk_entropy`). ``dtype``: the sampler's compute dtype (``""`` = the model's;
    ``bfloat16`` samples in bf16 against an fp32 trainer, the mismatch the ``mismatch/*`` metrics and
    ``loss.tis_cap`` are about). ``kv_fork`` (default on): a branch starts from a copy of its parent's KV rows up
    to the branch point, within the cache, instead of prefilling its prefix again: APPO's branches (every level)
    and Tree-GRPO's expansions from the slots the previous phase left, ARPO / AEPO's copies from the parent's slot
    while it runs; a branch whose parent's slot was reused first (a later wave of a call with more branches than
    slots) prefills (``branch/kv_forked`` counts the forks). No copy of the cache is kept. ``cpu_kernels``
    (default on): on a CPU, decode steps run in the C++ kernels of `appo_jax.kernels` (weights packed as column
    panels, a layer in four product calls, attention over the cache in place; for SmolLM2 on a 2-core EPYC, 1.4-2.1x
    faster steps than XLA at 1-8 slots, README "Speed"; log-probs agree with XLA's to float32 rounding, which can
    tip a sampled token now and then). They run where the sampler's ``cpu_kernels`` can (the CPU the default
    backend, x86 with AVX2 + FMA or AVX-512, float32 compute, weights on one device, a C++ compiler to build them
    once per machine) and XLA runs the rest, the sampler's ``cpu_kernels_status`` and the engine's start-up line
    saying why; ``false``: XLA always. ``weights_dtype`` (``""`` = the model's): the sampler keeps its copy of the weights in this dtype, cast
    once per new policy; ``bfloat16`` with float32 compute halves the bytes a decode step reads (with
    ``cpu_kernels``, 1.4-1.7x faster steps for SmolLM2 at 1-2 slots, 1.02x at 8 where the products are bound by
    their multiply-adds; 78% of 32 greedy GSM8K rows identical to float32 over 96 tokens,
    `benchmarks/sampler_bf16.py`); the trainer's log-probs stay float32, and the ``mismatch/*`` metrics show the
    difference.
    """

    max_prompt_len: int = 2048
    max_response_len: int = 6144
    tool_call_limit: int = 3
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    repetition_penalty: float = 1.0
    num_slots: int = 0
    decode_chunk: int = 64
    tool_workers: int = 8
    tool_timeout_s: float = 30.0
    search_cache: str = ""
    probe_len: int = 20
    entropy: str = "exact"
    entropy_k: int = 10
    dtype: str = ""
    kv_fork: bool = True
    cpu_kernels: bool = True
    weights_dtype: str = ""

    def __post_init__(self):
        self.validate()

    def validate(self) -> None:
        """``ValueError`` naming ``rollout.<field>``, its value and what is accepted, for the first bad field."""
        def bad(name, what):
            raise ValueError(f"rollout.{name}={getattr(self, name)!r}; expected {what}")

        for name in ("max_prompt_len", "max_response_len", "decode_chunk", "tool_workers", "probe_len",
                     "entropy_k"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                bad(name, "a positive integer")
        for name in ("tool_call_limit", "top_k", "num_slots"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                bad(name, "a non-negative integer")
        for name, ok, what in (("temperature", lambda v: v >= 0, ">= 0 (0 = greedy)"),
                               ("top_p", lambda v: 0 < v <= 1, "0 < top_p <= 1"),
                               ("repetition_penalty", lambda v: v > 0, "> 0 (1 = off)"),
                               ("tool_timeout_s", lambda v: v > 0, "> 0")):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) \
                    or not ok(value):
                bad(name, what)
        if self.dtype not in ("", "float32", "bfloat16", "float16"):
            bad("dtype", "'' (the model's), float32, bfloat16 or float16")
        if self.weights_dtype not in ("", "float32", "bfloat16", "float16"):
            bad("weights_dtype", "'' (the model's), float32, bfloat16 or float16")
        if self.entropy not in ENTROPY_MODES:
            bad("entropy", f"one of {', '.join(ENTROPY_MODES)}")
        if not isinstance(self.search_cache, str):
            bad("search_cache", "a path (empty = the shipped search cache)")

    def fitted(self, prompts: Sequence, rollouts: int, multiple: int = 64) -> "RolloutConfig":
        """This config sized to a call: ``max_prompt_len`` cut to the longest ``prompt_ids`` of ``prompts``
        (rounded up to ``multiple``, never above the configured bound) and ``num_slots`` to the ``rollouts`` that
        run at once (never above a configured non-zero number). The KV cache (slots x (P + L + padding)) then
        holds what the call needs, not the configured maximum."""
        longest = max((len(p.prompt_ids) for p in prompts), default=1)
        p_len = min(self.max_prompt_len, -(-longest // multiple) * multiple)
        slots = max(1, rollouts if not self.num_slots else min(self.num_slots, rollouts))
        return dataclasses.replace(self, max_prompt_len=p_len, num_slots=slots)
