"""Branch-point candidates (docs/algorithm.md §1.2): a per-vocabulary boolean table, built once on the host from the
tokenizer, and the jitted per-token candidate mask.

A token id is a *candidate token* unless its decoded text is

* empty (e.g. a pure byte-fallback or control piece that decodes to nothing),
* a special token (``tokenizer.all_special_ids`` and added tokens flagged ``special``),
* whitespace-only (every character ``str.isspace()`` -- spaces, ``\\n``, tabs, ... -- or a control
  character of Unicode category ``Cc`` such as ``\\x00``), or
* punctuation-only: every non-whitespace character is punctuation, meaning its Unicode category starts with
  ``P`` (``. , ; : ! ? ' " ( ) [ ] { } - …`` and CJK punctuation) or it is in ``string.punctuation`` (which
  adds the ASCII symbols ``$ + < = > ^ ` | ~``). Other symbols (``→``, ``∑``, emoji, the replacement character
  of a partial UTF-8 byte token) and every token with a letter or digit stay candidates.

So a token is a candidate iff it is not special and contains at least one character that is neither blank
(whitespace or control) nor punctuation. The text of each id is decoded once, through ``convert_ids_to_tokens`` +
``convert_tokens_to_string`` (which maps byte-level BPE markers such as ``Ġ`` / ``Ċ`` and SentencePiece's ``▁``
to real spaces / newlines); never a decode call per generated token.
"""
from __future__ import annotations

import string
import unicodedata

import jax
import jax.numpy as jnp
import numpy as np

Array = jax.Array

_ASCII_PUNCT = frozenset(string.punctuation)


def is_punctuation_char(ch: str) -> bool:
    """True for a Unicode punctuation character (category ``P*``) or an ASCII ``string.punctuation`` symbol."""
    return ch in _ASCII_PUNCT or unicodedata.category(ch).startswith("P")


def is_blank_char(ch: str) -> bool:
    """True for whitespace (``str.isspace``) or a control character (Unicode category ``Cc``)."""
    return ch.isspace() or unicodedata.category(ch) == "Cc"


def is_candidate_text(text: str) -> bool:
    """True iff ``text`` has a character that is neither blank nor punctuation (see the module doc)."""
    return any(not is_blank_char(ch) and not is_punctuation_char(ch) for ch in text)


def candidate_table_from_strings(token_texts, special_ids=()) -> np.ndarray:
    """``table[i] = is_candidate_text(token_texts[i]) and i not in special_ids`` as a host ``bool[V]`` array."""
    table = np.fromiter((is_candidate_text(t) for t in token_texts), dtype=bool, count=len(token_texts))
    special = np.asarray(sorted(set(int(i) for i in special_ids)), dtype=np.int64)
    if special.size and (special.min() < 0 or special.max() >= table.size):
        raise ValueError(f"candidate_table_from_strings: special_ids must lie in [0, {table.size}), "
                         f"got {special.min()}..{special.max()}")
    table[special] = False
    return table


def _special_ids(tokenizer) -> set[int]:
    ids = set(int(i) for i in getattr(tokenizer, "all_special_ids", ()) or ())
    for i, tok in (getattr(tokenizer, "added_tokens_decoder", None) or {}).items():
        if getattr(tok, "special", False):
            ids.add(int(i))
    return ids


def token_texts(tokenizer) -> list[str]:
    """The decoded text of every token id ``0 .. len(tokenizer) - 1`` (one conversion per id, done once)."""
    vocab_size = len(tokenizer)
    pieces = tokenizer.convert_ids_to_tokens(list(range(vocab_size)))
    return [tokenizer.convert_tokens_to_string([p]) if p is not None else "" for p in pieces]


def official_candidate_table_from_strings(token_texts) -> np.ndarray:
    """The official implementation's filter (``branching_parity = "official"``): ``table[i] = token_texts[i].strip()
    != ""`` -- only empty and whitespace-only tokens are dropped; punctuation and special tokens stay candidates."""
    return np.fromiter((bool(t.strip()) for t in token_texts), dtype=bool, count=len(token_texts))


#: ``algorithm.branching_parity`` -> ``rule(token_texts, special_ids) -> bool[V]``.
CANDIDATE_RULES = {
    "appo_jax": candidate_table_from_strings,
    "official": lambda texts, special_ids: official_candidate_table_from_strings(texts),
}


def candidate_token_table(tokenizer, rule: str = "appo_jax") -> np.ndarray:
    """Host ``bool[V]`` table (V = ``len(tokenizer)``) of candidate token ids for a Hugging Face tokenizer.

    ``rule = "appo_jax"``: ``table[i]`` is False for special, empty, whitespace-only and punctuation-only tokens
    (module doc); ``"official"``: False only for empty and whitespace-only tokens
    (`official_candidate_table_from_strings`). Build it once per tokenizer and pass it to :func:`candidate_mask`.
    Ids >= V (padding rows of an enlarged embedding) are treated as non-candidates by :func:`candidate_mask`.
    """
    if rule not in CANDIDATE_RULES:
        raise ValueError(f"unknown candidate rule {rule!r}; known: {', '.join(CANDIDATE_RULES)}")
    return CANDIDATE_RULES[rule](token_texts(tokenizer), _special_ids(tokenizer))


@jax.jit
def candidate_mask(tokens, gen_mask, table, max_response_len) -> Array:
    """``cand[n, t] = table[tokens[n, t]] & gen_mask[n, t] & (t + 1 < max_response_len)``.

    ``tokens`` / ``gen_mask`` ``[N, L]`` (response positions); ``table`` ``bool[V]``; token ids outside
    ``[0, V)`` count as non-candidates. ``max_response_len`` is a scalar or a per-row ``[N]`` budget: a branch
    must have room to continue after position t. Returns ``bool[N, L]``.
    """
    tokens = jnp.asarray(tokens).astype(jnp.int32)
    table = jnp.asarray(table).astype(bool)
    in_vocab = (tokens >= 0) & (tokens < table.shape[0])
    # the lookup keeps the sharding of `tokens` (also under explicitly sharded meshes)
    looked_up = table.at[jnp.where(in_vocab, tokens, 0)].get(out_sharding=jax.typeof(tokens).sharding)
    in_table = looked_up & in_vocab
    limit = jnp.asarray(max_response_len, jnp.int32)
    limit = limit[:, None] if limit.ndim == 1 else limit
    room = jnp.arange(tokens.shape[-1], dtype=jnp.int32) + 1 < limit
    return in_table & jnp.asarray(gen_mask).astype(bool) & room
