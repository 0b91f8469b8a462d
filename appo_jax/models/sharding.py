"""The shardings of a model's parameters and of its KV cache, from their logical axes (`appo_jax.parallel.rules`).

  param_shardings(config, mesh) -> NamedSharding pytree of the params (nothing allocated)
  shard_params(params, mesh, config) -> params placed with those shardings
  cache_shardings(cache, mesh) -> KVCache of NamedShardings (rows over data x fsdp, kv heads over tensor)
"""
from __future__ import annotations

from collections.abc import Mapping

import jax

from appo_jax.models.config import ModelConfig
from appo_jax.models.decoder import init_params, param_logical_axes
from appo_jax.models.kv_cache import KVCache
from appo_jax.parallel.rules import DEFAULT_RULES, logical_to_sharding


def param_shardings(config: ModelConfig, mesh: jax.sharding.Mesh, rules: Mapping = DEFAULT_RULES):
    """NamedSharding pytree for the params of ``config`` (shapes via jax.eval_shape, nothing allocated)."""
    shapes = jax.eval_shape(lambda: init_params(config, jax.random.PRNGKey(0)))
    return logical_to_sharding(param_logical_axes(config), mesh, rules, shapes)


def shard_params(params, mesh: jax.sharding.Mesh, config: ModelConfig, rules: Mapping = DEFAULT_RULES):
    """``params`` placed on ``mesh`` with their NamedShardings (jax.device_put; a no-op move for leaves already
    placed that way)."""
    return jax.device_put(params, logical_to_sharding(param_logical_axes(config), mesh, rules, params))


def cache_shardings(cache: KVCache, mesh: jax.sharding.Mesh, rules: Mapping = DEFAULT_RULES) -> KVCache:
    """KVCache of NamedShardings for ``cache`` (rows over data x fsdp, kv heads over tensor where they divide)."""
    return logical_to_sharding(cache.logical_axes(), mesh, rules, cache)
