"""Progress bars for long commands (tqdm, on stderr): counts, rate, ETA and a throughput figure.

Every long command shows one (``eval``, ``rollout``, ``data prepare``, SFT, training): `progress_bar` for a count
of known size, `RolloutProgress` for an agent-loop run (finished rollouts of a total that branching may grow,
generated tokens/s). Bars refresh at most once a second and draw nothing when ``enabled`` is False.
"""
from __future__ import annotations

import sys
import time

from tqdm import tqdm


def progress_bar(total: int | None, desc: str, unit: str, *, enabled: bool = True, leave: bool = True) -> tqdm:
    """A tqdm bar on stderr: ``desc: 12/40 unit [elapsed<ETA, rate]`` plus any postfix the caller sets."""
    return tqdm(total=total, desc=desc, unit=unit, disable=not enabled, leave=leave, dynamic_ncols=True,
                mininterval=1.0, file=sys.stderr)


class RolloutProgress:
    """Progress of agent-loop runs, fed by the loop with increments after every decode chunk:
    ``progress(finished, added, tokens)`` = rollouts finished, rollout requests added (the initial ones, then any
    that branching adds) and tokens generated since the last call. Several runs (e.g. Tree-GRPO's rounds) add
    up in one bar: finished / total rollouts, the ETA and generated tokens per second."""

    def __init__(self, desc: str = "rollouts", *, enabled: bool = True, leave: bool = True):
        self.bar = progress_bar(0, desc, "rollout", enabled=enabled, leave=leave)
        self.tokens = 0
        self._t0 = time.perf_counter()

    def __call__(self, finished: int, added: int, tokens: int) -> None:
        bar = self.bar
        if added:
            bar.total += added
        self.tokens += tokens
        rate = self.tokens / max(time.perf_counter() - self._t0, 1e-9)
        bar.set_postfix_str(f"{self.tokens} tokens, {rate:.1f} tok/s", refresh=False)
        bar.update(finished)

    def close(self) -> None:
        self.bar.close()

    def __enter__(self) -> "RolloutProgress":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
