"""The batched environments (imports `training` and `data`).

* `engine.py`: what both environments share: rows, episodes, the stop-loss, the kernels' step;
* `trading_env.py`: the base class and `SpecialistEnv` (one instrument per row);
* `portfolio_env.py`: `PortfolioEnv` (all instruments per row, under the risk manager);
* `gym_env.py`: the Gymnasium adapters behind `MTQ/Specialist-v0` and `MTQ/Portfolio-v0`.
"""
