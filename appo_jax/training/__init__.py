"""Training: experiment configs, train state, chunked log-probs, the sharded train step, the RL loop of every
algorithm, cold-start SFT, Orbax checkpoints, metrics, rollout dumps, evaluation and the train / eval CLI.

Entry points: ``appo-jax train --config experiments/<x>.py`` (:mod:`appo_jax.training.commands`) or, from
Python, ``Trainer(load_config(path)).run()`` (:mod:`appo_jax.training.trainer`).
"""
