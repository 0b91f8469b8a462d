"""The CPU kernel for decode-step products (`appo_jax.kernels.cpu_matmul`): against float64 NumPy over shapes
that hit every tail (rows past 8, columns not a multiple of the vector width, K of 1), inside the sampler against
XLA's dot, and the reasons it is not used."""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from appo_jax.kernels import cpu_matmul
from appo_jax.models.loading import load_model
from appo_jax.parallel.mesh import make_mesh
from appo_jax.rollout.sampler import Sampler
from appo_jax.rollout.sampling import SamplingParams


@pytest.fixture(scope="module")
def kernel():
    ok, why = cpu_matmul.kernel_status()
    if not ok and why.startswith("no C++ compiler"):
        pytest.skip(why)  # the one condition outside the project: everything else must build here
    assert ok, why
    return ok


@pytest.mark.parametrize("transposed", [False, True])
@pytest.mark.parametrize("weight_dtype", ["float32", "bfloat16"])
def test_skinny_matmul_matches_float64_numpy(kernel, transposed, weight_dtype):
    rng = np.random.default_rng(0)
    f = jax.jit(lambda x, w: cpu_matmul.skinny_matmul(x, w, w_transposed=transposed))
    for m, k, n in [(1, 576, 192), (2, 576, 1536), (3, 17, 47), (5, 1, 16), (8, 577, 15), (8, 64, 1), (11, 33, 100),
                    (16, 40, 577), (1, 1536, 576), (2, 9, 7)]:
        x = rng.standard_normal((m, k), dtype=np.float32)
        w = jnp.asarray(rng.standard_normal((n, k) if transposed else (k, n), dtype=np.float32), weight_dtype)
        y = np.asarray(f(x, w))
        w64 = np.asarray(w.astype(jnp.float32), np.float64)  # bf16 -> float32 is exact
        ref = x.astype(np.float64) @ (w64.T if transposed else w64)
        bound = np.abs(x).astype(np.float64) @ np.abs(w64.T if transposed else w64)
        assert y.shape == (m, n) and y.dtype == np.float32
        assert np.all(np.abs(y - ref) <= 1e-6 * bound + 1e-30), (m, k, n, float(np.max(np.abs(y - ref) / bound)))


def test_skinny_matmul_refuses_what_it_cannot_compute(kernel):
    x = jnp.ones((2, 8), jnp.float32)
    with pytest.raises(ValueError, match="do not contract"):
        cpu_matmul.skinny_matmul(x, jnp.ones((4, 8), jnp.float32))
    with pytest.raises(ValueError, match="float32"):
        cpu_matmul.skinny_matmul(x.astype(jnp.bfloat16), jnp.ones((8, 4), jnp.bfloat16))
    with pytest.raises(ValueError, match="bfloat16 w"):
        cpu_matmul.skinny_matmul(x, jnp.ones((8, 4), jnp.float16))


@pytest.mark.parametrize("rows, expected", [(1, set()), (3, {"appo_skinny_kn", "appo_skinny_nk"}),
                                            (8, {"appo_skinny_nk"}), (16, set())])
def test_the_decoder_calls_the_kernel_at_the_row_counts_where_it_is_faster(kernel, rows, expected):
    """``ModelConfig.cpu_kernels``: the products of a [rows, 1] forward go to the kernel per `KERNEL_ROWS`."""
    import dataclasses
    from appo_jax.models.decoder import forward, unstack_layers
    config, params, _ = load_model("tiny-llama")
    config = dataclasses.replace(config, cpu_kernels=True)
    tokens = jnp.ones((rows, 1), jnp.int32)
    hlo = jax.jit(lambda p, t: forward(p, t, t, config=config)[0]).lower(unstack_layers(params), tokens).as_text()
    assert {t for t in ("appo_skinny_kn", "appo_skinny_nk") if t in hlo} == expected
    assert all(set(cpu_matmul.KERNEL_ROWS[t]) <= set(range(2, 9)) for t in (False, True))


@pytest.mark.parametrize("preset, weights", [("tiny-llama", "float32"),    # a tied embedding: the nk kernel
                                             ("tiny-qwen2", "bfloat16")])  # lm_head + q/k/v bias, bf16 weights
def test_the_sampler_with_cpu_kernels_samples_what_xla_does(kernel, preset, weights):
    """The same tokens and log-probs with the kernel as with XLA's dot (bf16 weights: XLA widens them to float32
    before its dot, the kernel in registers; the same products either way)."""
    config, params, _ = load_model(preset, rng=jax.random.PRNGKey(3), dtype="float32", param_dtype=weights)
    outs = []
    for cpu_kernels in (False, True):
        s = Sampler(config, params, num_slots=4, max_len=64, decode_chunk=6, min_attention_window=64,
                    sampling=SamplingParams(1.0), eos_token_ids=(), cpu_kernels=cpu_kernels)
        assert s.cpu_kernels_status[0] == cpu_kernels and s.config.cpu_kernels == cpu_kernels
        s.start([0, 1, 2], [[1, 8, 21, 7], [1, 5], [3, 3, 3]], [jax.random.key(i) for i in range(3)])
        a = s.decode(np.array([True, True, True, False]), 6)
        s.append([0], [[40, 41]])  # an extend of 4 x 2 rows: the kernel's 8-row case
        b = s.decode(np.array([True, True, True, False]), 6)
        outs.append((a, b))
    for x, y in zip(*outs):
        np.testing.assert_array_equal(x.tokens, y.tokens)
        np.testing.assert_allclose(x.logprobs, y.logprobs, atol=1e-5)
        np.testing.assert_allclose(x.entropies, y.entropies, atol=1e-4)


def test_the_sampler_says_why_it_does_not_use_the_kernel(monkeypatch):
    config, params, _ = load_model("tiny-llama", dtype="bfloat16")
    s = Sampler(config, params, num_slots=2, max_len=32, cpu_kernels=True)
    assert s.cpu_kernels_status == (False, "the sampler computes in bfloat16 with bfloat16 weights, not float32 "
                                           "with float32 or bfloat16 weights")
    assert not s.config.cpu_kernels
    config, params, _ = load_model("tiny-llama")
    mesh = make_mesh(data=2, devices=jax.devices()[:2])
    assert Sampler(config, params, num_slots=2, max_len=32, cpu_kernels=True, mesh=mesh).cpu_kernels_status == (
        False, "the sampler is sharded over 2 devices")
    assert Sampler(config, params, num_slots=2, max_len=32).cpu_kernels_status == (False, "not asked for")
    spread = jax.device_put(params, jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec()))
    assert Sampler(config, spread, num_slots=2, max_len=32, cpu_kernels=True).cpu_kernels_status == (
        False, "the weights are spread over 2 devices")
    # no compiler: the status says so (and the kernel is never called)
    monkeypatch.setenv("CXX", "no-such-compiler-appo")
    cpu_matmul.kernel_status.cache_clear()
    try:
        assert cpu_matmul.kernel_status() == (False, "no C++ compiler (no-such-compiler-appo) on PATH")
        s = Sampler(config, params, num_slots=2, max_len=32, cpu_kernels=True)
        assert not s.cpu_kernels_status[0] and not s.config.cpu_kernels
    finally:
        cpu_matmul.kernel_status.cache_clear()


def test_a_failed_build_is_a_reason_not_a_crash(monkeypatch, tmp_path):
    fake = tmp_path / "fakecxx"
    fake.write_text("#!/bin/sh\n[ \"$1\" = --version ] && { echo fake 1.0; exit 0; }\necho 'fake: no' >&2; exit 1\n")
    fake.chmod(0o755)
    monkeypatch.setenv("CXX", str(fake))
    monkeypatch.setenv(cpu_matmul.CACHE_ENV, str(tmp_path / "kernels"))
    cpu_matmul.kernel_status.cache_clear()
    try:
        ok, why = cpu_matmul.kernel_status()
        assert not ok and why.startswith("building cpu_skinny_matmul.cc failed") and "fake: no" in why
        assert not list((tmp_path / "kernels").glob("*.so"))
    finally:
        cpu_matmul.kernel_status.cache_clear()


def test_the_sampler_keeps_its_weights_in_the_configs_param_dtype():
    """``rollout.weights_dtype``: a float32 policy given to a sampler whose config says bfloat16 weights is cast once
    (and samples what a sampler given the bf16 weights directly samples); a bad dtype is one clear error."""
    import dataclasses
    from appo_jax.rollout.config import RolloutConfig
    config, params, _ = load_model("tiny-llama", rng=jax.random.PRNGKey(5))
    bf16 = dataclasses.replace(config, param_dtype="bfloat16")
    cast = jax.tree.map(lambda x: x.astype(jnp.bfloat16), params)
    outs = []
    for weights in (params, cast):
        s = Sampler(bf16, weights, num_slots=2, max_len=32, decode_chunk=4, sampling=SamplingParams(0.0),
                    eos_token_ids=())
        assert {x.dtype for x in jax.tree.leaves(s.params)} == {jnp.dtype(jnp.bfloat16)}
        s.start([0, 1], [[1, 8, 21], [1, 5]], [jax.random.key(0), jax.random.key(1)])
        outs.append(s.decode(np.array([True, True]), 4))
        s.set_params(params)  # a new float32 policy: cast again
        assert {x.dtype for x in jax.tree.leaves(s.params)} == {jnp.dtype(jnp.bfloat16)}
    np.testing.assert_array_equal(outs[0].tokens, outs[1].tokens)
    np.testing.assert_array_equal(outs[0].logprobs, outs[1].logprobs)
    with pytest.raises(ValueError, match="rollout.weights_dtype='int8'"):
        RolloutConfig(weights_dtype="int8")
