"""The market: what every environment and evaluation reads (imports `training` only).

* `market.py`: `MarketData`, one split of aligned close prices, and its conventions;
* `synthetic.py`: the built-in market; `csv_file.py` (one file) and `csv_data.py` (a folder, aligned);
* `splits.py`: the train, validation and test splits of a run (`load_splits`), walk-forward folds included;
* `features.py`: the causal per-instrument features; `volatility.py`: the market's normalised volatility;
* `tables.py`: the per-bar tensors the environments step through (features, covariances, limits).
"""
