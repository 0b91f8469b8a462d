"""One math-verify comparison (`verify_equal`) and the worker process that serves them over pipes.

Run as a program (``python math_worker.py``; it imports only the standard library and math_verify, never
appo_jax, so it starts without JAX): prints ``ready``, then for every JSON line ``{"p": prediction, "g": gold}``
on stdin prints one JSON line ``{"equal": bool}``; exits at end of input. Comparisons run without math-verify's
own signal timeouts — the parent (`appo_jax.rewards.math_equivalence`) enforces the time limit by killing the
worker.
"""
import json
import math
import re
import sys

#: A plain integer of at most 15 digits: math-verify compares two of them exactly (no float rounding reaches them),
#: so `verify_equal` decides them without importing it (sympy; ~1 s the first time in a process).
PLAIN_INTEGER = re.compile(r"[+-]?\d{1,15}")


def _wrap(expr: str) -> str:
    return expr if "\\boxed" in expr else "\\boxed{" + expr + "}"


def verify_equal(prediction: str, gold: str, timeout_s: float | None) -> bool:
    """math-verify equivalence of two answer strings (bare LaTeX/plain expressions; ``\\boxed{}`` added).

    Both sides are parsed as ``\\boxed{expr}`` (falling back to the bare string); unparsable -> False;
    then ``verify(gold, prediction)``. `timeout_s` is math-verify's per-step signal timeout (rounded up to whole
    seconds; main thread only) or None for none. Two `PLAIN_INTEGER` strings are equal iff ``int(p) == int(g)``
    (what math-verify finds, without it).
    """
    p, g = prediction.strip(), gold.strip()
    if PLAIN_INTEGER.fullmatch(p) and PLAIN_INTEGER.fullmatch(g):
        return int(p) == int(g)
    from math_verify import parse, verify

    t = None if timeout_s is None else max(1, math.ceil(timeout_s))
    gold_parsed = parse(_wrap(gold), parsing_timeout=t) or parse(gold, parsing_timeout=t)
    pred_parsed = parse(_wrap(prediction), parsing_timeout=t) or parse(prediction, parsing_timeout=t)
    if not gold_parsed or not pred_parsed:
        return False
    return bool(verify(gold_parsed, pred_parsed, timeout_seconds=t))


def main() -> None:
    import logging

    logging.disable(logging.WARNING)  # "timeout is disabled" warnings: the parent owns the timeout
    verify_equal("1/2", "0.5", None)  # warm up imports and parsers (not two integers: no shortcut) before "ready"
    out = sys.stdout
    out.write("ready\n")
    out.flush()
    for line in sys.stdin:
        request = json.loads(line)
        try:
            equal = verify_equal(request["p"], request["g"], None)
        except Exception:  # noqa: BLE001 - an unparsable or crashing comparison is "not equal"
            equal = False
        out.write(json.dumps({"equal": equal}) + "\n")
        out.flush()


if __name__ == "__main__":
    main()
