"""Logits parity against transformers (PyTorch float32) for tiny random Llama / Qwen2 / Qwen3 models, HF dir
import (single file and sharded index) / export round trip, and clear errors on bad checkpoints."""
import json
import os
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from appo_jax.models import forward  # noqa: E402
from appo_jax.models.hf_io import export_hf, load_hf, load_hf_config  # noqa: E402
from appo_jax.models.loading import load_model  # noqa: E402
from appo_jax.models.safetensors_file import SafetensorsError  # noqa: E402
from appo_jax.models.weight_map import MissingWeightError, WeightShapeError  # noqa: E402

COMMON = dict(vocab_size=96, hidden_size=48, intermediate_size=80, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=2, max_position_embeddings=128, rms_norm_eps=1e-5)
LLAMA3_ROPE = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": 16}
CASES = {
    "llama-tied": ("LlamaConfig", "LlamaForCausalLM", dict(tie_word_embeddings=True)),
    "llama-untied-llama3rope": ("LlamaConfig", "LlamaForCausalLM",
                                dict(tie_word_embeddings=False, rope_scaling=LLAMA3_ROPE, rope_theta=500.0)),
    "llama-linear-rope": ("LlamaConfig", "LlamaForCausalLM",
                          dict(tie_word_embeddings=True, rope_scaling={"rope_type": "linear", "factor": 3.0})),
    "qwen2-bias-untied": ("Qwen2Config", "Qwen2ForCausalLM", dict(tie_word_embeddings=False)),
    "qwen3-qknorm-tied": ("Qwen3Config", "Qwen3ForCausalLM", dict(tie_word_embeddings=True, head_dim=16)),
    "qwen3-yarn": ("Qwen3Config", "Qwen3ForCausalLM",
                   dict(head_dim=16, rope_scaling={"rope_type": "yarn", "factor": 4.0,
                                                   "original_max_position_embeddings": 32})),
}
TOL = 1e-4
fwd = jax.jit(forward, static_argnames=("config", "return_hidden"))


def _torch_model(case, seed=0):
    config_cls, model_cls, kwargs = CASES[case]
    torch.manual_seed(seed)
    model = getattr(transformers, model_cls)(getattr(transformers, config_cls)(**COMMON, **kwargs)).eval()
    with torch.no_grad():  # large random weights (incl. norm scales and biases): a wrong layout cannot hide
        for name, p in model.named_parameters():
            p.copy_(1.0 + 0.2 * torch.randn_like(p) if "norm" in name else 0.15 * torch.randn_like(p))
    return model


@pytest.fixture(scope="module")
def hf_dirs(tmp_path_factory):
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny models: thread start-up and contention with XLA cost more than they give
    out = {}
    for case in CASES:
        model = _torch_model(case)
        path = str(tmp_path_factory.mktemp(case))
        model.save_pretrained(path)
        out[case] = (path, model)
    yield out
    torch.set_num_threads(threads)


def _torch_logits(model, tokens, mask=None, positions=None):
    kwargs = {}
    if mask is not None:
        kwargs["attention_mask"] = torch.tensor(mask.astype(np.int64))
    if positions is not None:
        kwargs["position_ids"] = torch.tensor(positions.astype(np.int64))
    with torch.no_grad():
        return model(torch.tensor(tokens.astype(np.int64)), **kwargs).logits.numpy()


@pytest.mark.parametrize("case", list(CASES))
def test_logits_parity_no_padding(hf_dirs, case):
    path, model = hf_dirs[case]
    config, params = load_hf(path)
    assert config.qkv_bias == case.startswith("qwen2") and config.qk_norm == case.startswith("qwen3")
    assert config.tie_word_embeddings == CASES[case][2].get("tie_word_embeddings", False)
    tokens = np.random.RandomState(1).randint(0, COMMON["vocab_size"], (2, 40))
    positions = np.broadcast_to(np.arange(40), (2, 40))
    ours, _ = fwd(params, jnp.asarray(tokens), jnp.asarray(positions), config=config)
    ref = _torch_logits(model, tokens)
    assert np.abs(ref).max() > 1.0  # the comparison is not between near-zero logits
    assert np.abs(np.asarray(ours) - ref).max() < TOL


@pytest.mark.parametrize("case", ["llama-untied-llama3rope", "qwen2-bias-untied", "qwen3-qknorm-tied"])
def test_logits_parity_with_padding(hf_dirs, case):
    """Left and right padding via token_mask / attention_mask and explicit positions: equal on real tokens."""
    path, model = hf_dirs[case]
    config, params = load_hf(path)
    rng = np.random.RandomState(2)
    tokens = rng.randint(0, COMMON["vocab_size"], (3, 12))
    mask = np.ones((3, 12), bool)
    mask[0, :5] = False  # left padded
    mask[1, 9:] = False  # right padded
    positions = np.maximum(np.cumsum(mask, axis=1) - 1, 0)
    ours, _ = fwd(params, jnp.asarray(tokens), jnp.asarray(positions), config=config,
                      token_mask=jnp.asarray(mask))
    ref = _torch_logits(model, tokens, mask, positions)
    assert np.abs(np.asarray(ours)[mask] - ref[mask]).max() < TOL


def test_export_then_transformers_load_same_logits(hf_dirs, tmp_path):
    for case in ("qwen2-bias-untied", "llama-untied-llama3rope", "qwen3-qknorm-tied"):
        path, model = hf_dirs[case]
        config, params = load_hf(path)
        out = str(tmp_path / case)
        export_hf(params, config, out)
        reloaded = transformers.AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
        tokens = np.random.RandomState(3).randint(0, COMMON["vocab_size"], (2, 40))
        assert np.abs(_torch_logits(reloaded, tokens) - _torch_logits(model, tokens)).max() < 1e-6
        ours, _ = fwd(params, jnp.asarray(tokens), jnp.broadcast_to(jnp.arange(40), (2, 40)), config=config)
        assert np.abs(np.asarray(ours) - _torch_logits(reloaded, tokens)).max() < TOL


def test_bf16_export_and_sharded_index_round_trip(hf_dirs, tmp_path):
    path, _ = hf_dirs["qwen2-bias-untied"]
    config, params = load_hf(path, param_dtype="bfloat16")
    assert all(leaf.dtype == jnp.bfloat16 for leaf in jax.tree.leaves(params))
    out = str(tmp_path / "sharded")
    export_hf(params, config, out, max_shard_bytes=20_000)
    index = json.load(open(os.path.join(out, "model.safetensors.index.json")))
    assert len(set(index["weight_map"].values())) > 2
    assert json.load(open(os.path.join(out, "config.json")))["dtype"] == "bfloat16"
    config2, params2 = load_hf(out, param_dtype="bfloat16")
    assert config2 == config
    jax.tree.map(lambda a, b: np.testing.assert_array_equal(np.asarray(a), np.asarray(b)), params, params2)


def test_load_model_hf_dir_with_dtypes(hf_dirs):
    path, _ = hf_dirs["llama-tied"]
    config, params, tokenizer = load_model(path, dtype="bfloat16", param_dtype="float32", remat_policy="full")
    assert (config.dtype, config.param_dtype, config.remat_policy) == ("bfloat16", "float32", "full")
    assert tokenizer is None  # save_pretrained of a bare model writes no tokenizer
    assert params["embed_tokens"]["embedding"].dtype == jnp.float32


# ------------------------------------------------------------------------------------------------ bad input
def _copy(src, dst):
    shutil.copytree(src, dst)
    return str(dst)


def test_missing_dir_and_config(tmp_path):
    with pytest.raises(FileNotFoundError, match="not found"):
        load_hf(str(tmp_path / "nope"))
    with pytest.raises(FileNotFoundError, match="config.json"):
        load_hf(str(tmp_path))
    with pytest.raises(ValueError, match="is not a preset"):
        load_model(str(tmp_path / "nope"))


def test_no_weight_files(hf_dirs, tmp_path):
    path = _copy(hf_dirs["llama-tied"][0], tmp_path / "m")
    os.remove(os.path.join(path, "model.safetensors"))
    with pytest.raises(FileNotFoundError, match=r"no \*\.safetensors"):
        load_hf(path)


def test_corrupt_and_truncated_weight_file(hf_dirs, tmp_path):
    path = _copy(hf_dirs["llama-tied"][0], tmp_path / "m")
    weights = os.path.join(path, "model.safetensors")
    data = open(weights, "rb").read()
    open(weights, "wb").write(data[: len(data) // 2])
    with pytest.raises(SafetensorsError, match="model.safetensors.*truncated"):
        load_hf(path)
    open(weights, "wb").write(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json at all")
    with pytest.raises(SafetensorsError, match="model.safetensors.*corrupt"):
        load_hf(path)


def test_index_names_missing_shard(hf_dirs, tmp_path):
    path, _ = hf_dirs["llama-tied"]
    config, params = load_hf(path)
    out = str(tmp_path / "sharded")
    export_hf(params, config, out, max_shard_bytes=20_000)
    os.remove(os.path.join(out, "model-00002-of-%05d.safetensors" % len(
        set(json.load(open(os.path.join(out, "model.safetensors.index.json")))["weight_map"].values()))))
    with pytest.raises(FileNotFoundError, match="model-00002-of"):
        load_hf(out)


def _edit_config(path, **changes) -> None:
    """Overwrite keys of the HF config.json in directory ``path``."""
    cfg_path = os.path.join(path, "config.json")
    d = json.load(open(cfg_path))
    d.update(changes)
    json.dump(d, open(cfg_path, "w"))


def test_shape_mismatch_names_tensor_and_shapes(hf_dirs, tmp_path):
    path = _copy(hf_dirs["qwen2-bias-untied"][0], tmp_path / "m")
    _edit_config(path, intermediate_size=64)
    with pytest.raises(WeightShapeError, match=r"model.layers.0.mlp.gate_proj.weight.*\(80, 48\).*\(64, 48\)"):
        load_hf(path)


def test_missing_tensor_is_named(hf_dirs, tmp_path):
    path = _copy(hf_dirs["llama-tied"][0], tmp_path / "m")
    _edit_config(path, tie_word_embeddings=False)  # now lm_head.weight is needed but absent
    with pytest.raises(MissingWeightError, match="'lm_head.weight'"):
        load_hf(path)


def test_unsupported_configs_are_rejected(hf_dirs, tmp_path):
    path = _copy(hf_dirs["llama-tied"][0], tmp_path / "m")
    _edit_config(path, rope_parameters={"rope_type": "longrope", "rope_theta": 10000.0})
    with pytest.raises(NotImplementedError, match="longrope"):
        load_hf_config(path)
    _edit_config(path, model_type="gpt2")
    with pytest.raises(NotImplementedError, match="gpt2"):
        load_hf_config(path)
