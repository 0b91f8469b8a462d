"""The sampling presets an evaluation runs with (`appo-jax eval --preset`, the trainer's held-out modes): ``paper`` (the paper's text), ``official`` (the official evaluation
scripts) and ``greedy``.

=========  ===========  =====  =====  ==================  ================
preset     temperature  top_p  top_k  repetition penalty  tool calls
=========  ===========  =====  =====  ==================  ================
paper      0.6          0.95   off    1.1                 --tool-call-limit
official   0.6          0.95   20     1.1                 15 (5 python + 10 search in the scripts)
greedy     0 (argmax)   -      -      off                 --tool-call-limit
=========  ===========  =====  =====  ==================  ================

The official scripts also allow 4096 new tokens per model call; here the response budget covers the whole
response (generated tokens and tool results, ``--max-response-len``), and the tool-call limit is one total, not
one per tool. Both differences are printed in the summary of an evaluation that uses ``official``.
"""
from __future__ import annotations

import dataclasses

from appo_jax.rollout.config import RolloutConfig


@dataclasses.dataclass(frozen=True)
class SamplingPreset:
    """A named sampling setting; ``tool_call_limit`` None keeps the caller's."""

    name: str
    temperature: float
    top_p: float
    top_k: int
    repetition_penalty: float
    tool_call_limit: int | None
    source: str

    def apply(self, rollout: RolloutConfig) -> RolloutConfig:
        """``rollout`` with this preset's sampling (and tool-call limit when the preset has one)."""
        cfg = dataclasses.replace(rollout, temperature=self.temperature, top_p=self.top_p, top_k=self.top_k,
                                  repetition_penalty=self.repetition_penalty)
        return cfg if self.tool_call_limit is None else dataclasses.replace(cfg, tool_call_limit=self.tool_call_limit)


PRESETS: dict[str, SamplingPreset] = {
    "paper": SamplingPreset("paper", 0.6, 0.95, 0, 1.1, None,
                            "the paper's evaluation settings (docs/algorithm.md §1.8)"),
    "official": SamplingPreset("official", 0.6, 0.95, 20, 1.1, 15,
                               "the official evaluation scripts (top_k 20; 5 python + 10 search calls; 4096 new "
                               "tokens per call, here one budget for the whole response)"),
    "greedy": SamplingPreset("greedy", 0.0, 1.0, 0, 1.0, None, "greedy decoding (argmax, no penalty)"),
}


def get_preset(name: str) -> SamplingPreset:
    """The preset ``name``; ``ValueError`` naming the known presets."""
    if name not in PRESETS:
        raise ValueError(f"unknown evaluation preset {name!r}; known: {', '.join(PRESETS)}")
    return PRESETS[name]
