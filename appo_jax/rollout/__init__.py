"""Rollouts: the jitted slot sampler (`sampler`, token selection in `sampling`), the multi-turn tool loop on top
of it (`agent_loop`, `engine`), sampler throughput (`throughput`) and their CLI (`commands`: generate / rollout /
bench sampler).

Nothing is imported here so that `appo-jax` sub-commands start without loading JAX models; import the modules.
"""
