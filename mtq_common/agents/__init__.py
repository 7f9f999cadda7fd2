"""The learners (imports `training`, `data` and `envs`).

* `nets.py`: the specialists and the meta-controller, as checkpoints store them;
* `hierarchy.py`: meta action + specialists' positions -> the proposed book (`HierarchyPolicy`);
* `ppo.py`: GAE, minibatches, the clipped surrogate, `FlatAdam`, the divergence guard;
* `update.py`: one PPO minibatch update, eager or compiled; `coordination.py`: Phase 3's gradient
  coordination; `curriculum.py`: Phase 3's curriculum; `rollout_stats.py`: a portfolio rollout's tags.
"""
