"""`SlotSampler`: the part of a slot-based sampler that the multi-turn tool loop needs, and the adapter that
builds it from the jitted :class:`~appo_jax.rollout.sampler.Sampler`.

A policy owns ``num_slots`` generation slots (rows of a KV cache). The tool loop

* ``start``s slots from token prefixes (prompt + any response prefix, e.g. a branch's parent prefix),
* ``append``s externally supplied tokens (tool results) to slots without sampling them, and
* ``decode``s one chunk of at most ``max_new[s]`` tokens for every active slot ``s``; a slot stops early inside
  the chunk at EOS or when its generated text completes one of the policy's stop strings.

Per generated token the chunk reports the token id, the behaviour log-prob ``log pi_b(a_t | s_t)`` and the exact
entropy of the sampling distribution (float32). The chunk type and its per-slot ``CHUNK_*`` codes are the
sampler's (:class:`~appo_jax.rollout.sampler.DecodeChunk`).
"""
from __future__ import annotations

from typing import Any, Protocol, Sequence

import numpy as np

from appo_jax.rollout.sampler import (CHUNK_EOS, CHUNK_LENGTH, CHUNK_RUNNING, CHUNK_STOP, DecodeChunk, Sampler,
                                      prefill_pieces)
from appo_jax.rollout.sampling import SamplingParams
from appo_jax.protocol import STOP_STRINGS


class SlotSampler(Protocol):
    """The slot interface the agent loop drives (see the module doc); :class:`Sampler` implements it."""

    num_slots: int

    def start(self, slots: Sequence[int], prefixes: Sequence[Sequence[int]], keys: Sequence[Any]) -> None:
        """Reset each slot ``slots[i]`` and fill it with ``prefixes[i]`` (non-empty); later tokens of that slot
        are sampled with the PRNG stream ``keys[i]``."""

    def append(self, slots: Sequence[int], tokens: Sequence[Sequence[int]]) -> None:
        """Append ``tokens[i]`` to slot ``slots[i]`` as context (not sampled, nothing recorded)."""

    def decode(self, active: np.ndarray, max_new: np.ndarray) -> DecodeChunk:
        """Decode one chunk for the slots with ``active[s]`` (bool ``[S]``), at most ``max_new[s]`` (int ``[S]``,
        >= 1 where active) new tokens each, stopping a slot early at EOS or at a completed stop string."""

    def set_params(self, params) -> None:
        """Use new policy weights for the following calls."""


def rollout_cache_len(max_prompt_len: int, max_response_len: int, tool_call_limit: int, prefill_chunk: int,
                      multiple: int = 64) -> int:
    """KV-cache slots per row that always fit one rollout: ``P + L`` real tokens plus the padding of the prefill
    pieces (:func:`~appo_jax.rollout.sampler.prefill_pieces`) of the start (at most ``P + L`` tokens) and of
    each of the ``tool_call_limit`` appends (at most ``L`` tokens each), rounded up to ``multiple``.

    A fill of ``m`` tokens consumes ``sum(prefill_pieces(m))`` slots; the bound takes the worst ``m`` for each
    fill (exact maximum over ``m`` of the padding, computed by scanning the sizes that can occur)."""
    def worst_padding(max_tokens: int) -> int:
        return max(sum(prefill_pieces(m, prefill_chunk)) - m for m in range(1, max_tokens + 1))

    total = max_prompt_len + max_response_len + worst_padding(max_prompt_len + max_response_len)
    if tool_call_limit > 0:
        total += tool_call_limit * worst_padding(max_response_len)
    return -(-total // multiple) * multiple


def make_slot_sampler(model_config, params, tokenizer, *, num_slots: int, max_prompt_len: int,
                        max_response_len: int, tool_call_limit: int, temperature: float = 1.0, top_p: float = 1.0,
                        top_k: int = 0, repetition_penalty: float = 1.0, entropy: str = "exact",
                        entropy_k: int = 10, decode_chunk: int = 16, prefill_chunk: int = 128,
                        stop_strings: Sequence[str] = STOP_STRINGS, cpu_kernels: bool = False) -> Sampler:
    """The jitted :class:`Sampler` set up as the tool loop's :class:`SlotSampler`: stop strings (default: the
    protocol's, :data:`~appo_jax.protocol.STOP_STRINGS`) detected on the tokenizer's text, EOS ids
    from ``model_config``, ``SamplingParams(temperature, top_p, top_k, repetition_penalty, entropy, entropy_k)``,
    and a cache row of
    :func:`rollout_cache_len` slots; ``cpu_kernels``: the sampler's option of that name."""
    def detokenize(ids: list[int]) -> str:
        return tokenizer.decode(ids, skip_special_tokens=False)

    return Sampler(model_config, params, num_slots=num_slots,
                   max_len=rollout_cache_len(max_prompt_len, max_response_len, tool_call_limit, prefill_chunk),
                   sampling=SamplingParams(float(temperature), float(top_p), int(top_k), float(repetition_penalty),
                                           entropy, int(entropy_k)),
                   stop_strings=tuple(stop_strings), detokenize=detokenize, decode_chunk=decode_chunk,
                   prefill_chunk=prefill_chunk, cpu_kernels=cpu_kernels)


__all__ = ["CHUNK_EOS", "CHUNK_LENGTH", "CHUNK_RUNNING", "CHUNK_STOP", "DecodeChunk", "SlotSampler",
           "make_slot_sampler", "rollout_cache_len"]
