"""Judging a policy (the top room: imports every other one).

* `rules.py`: the rule-based baselines as policies traded like the system; `backtest.py` and
  `backtest_metrics.py`: backtests through `PortfolioEnv` and their metrics; `metrics.py`: the formulas;
* `specialist_eval.py` and `portfolio_eval.py`: the validation and test reports of the phases;
* `bootstrap.py` and `sharpe_significance.py`: how much of a Sharpe ratio is luck;
* `report.py`, `report_text.py`, `plots.py`, `tearsheet.py`: the report on disk, on the terminal, as figures
  and as a tear sheet; `live_book.py`: the book to hold now (`pipeline.py --mode act`).
"""
