"""The meta-controller's fitted starting point (DESIGN 14): where capital goes, and how much, before PPO moves it.

Measured first (`benchmarks.meta_headroom`): over the specialists that start at the scaled trend, a linear map of
their recent sleeve returns to an allocation, fit on the training split, adds +0.21 [+0.09, +0.33] Sharpe on test
over `vol_managed_equal_allocation` (over the earlier PPO specialists, +0.07); a fitted timing of the book adds
+0.20 [+0.09, +0.31]. PPO did not find either from its own noisy rewards. So Phase 2 fits both first and starts
there:

    allocation_t = softmax(z_t[:K]),   appetite_t = min(1, a_t * exp(z_t[K])),   z_t = (x_t - mean) / std @ W + b
    x_t = EMAs of each specialist's unit-size sleeve return (half-lives `SLEEVE_HALF_LIVES`, up to bar t),
          then the volatility ratios log(sigma_hat_t / sigma*) the meta-controller observes (`risk_features`)

with `a_t` the volatility-managed rule's appetite (picked on validation). `W` [F, K + 1] and `b` maximise the
Sharpe ratio after costs of the book reallocated and scaled that way (`scaled_sharpe`: a plain vectorised
backtest of the equal allocation's backtest on the training split, as `rules.pick_vol_timing` ranks its
candidates) by Adam, with a small L2 penalty on `W` and a soft one on turnover per unit of volatility above
momentum's there (`TURNOVER_WEIGHT`: uncapped, the timed book traded 1.2x momentum's on validation and test);
`mean` and `std` standardise the features on train.
Without risk timing the map reads the sleeves alone and gives the allocation only (K columns, no bias). The
meta-controller's action then moves from this point (`hierarchy.MetaTracker`).

Phase 3's joint sizing, a factor per instrument on the specialists' positions, is fit the same way on the
Phase 2 hierarchy's book (`fit_joint_sizing`).
"""

from __future__ import annotations

import numpy as np
import torch

from mtq_common.agents.hierarchy import SLEEVE_HALF_LIVES, HierarchyPolicy, instrument_specialist_index, risk_features
from mtq_common.agents.ppo import FlatAdam
from mtq_common.data.market import MarketData
from mtq_common.data.tables import cost_rates
from mtq_common.evaluation.backtest import Backtest, run_backtests
from mtq_common.evaluation.rules import RulePolicy, momentum_positions
from mtq_common.training.config import Config

FIT_STEPS = 600
L2 = 1e-3
TURNOVER_WEIGHT = 0.1
"""Weight of the fit's penalty on turnover per unit of volatility above momentum's (its relative excess, on
train), against the per-bar Sharpe ratio (about 0.3 here): DESIGN 14 asks for no more than momentum's. Picked
on the validation split (the rule specialists; Sharpe, turnover per unit of volatility over momentum's): no
penalty 4.93, 1.21x; 0.1: 4.98, 0.89x; 0.3: 4.90, 0.88x; 0.5: 4.92, 0.82x; 1: 4.66, 0.80x; 10: 4.54, 0.88x
(a stiff penalty stalls the ascent)."""


def causal_ewma(x: np.ndarray, half_life: float, segment_length: int | None = None) -> np.ndarray:
    """[T, ...]: entry t is the EWMA of x[:t] (what is known before x[t]), restarting at 0 at each segment's
    start (as `MetaTracker` restarts a row's EMAs when its episode ends)."""
    alpha = 1.0 - 0.5 ** (1.0 / half_life)
    out, level = np.zeros_like(x), np.zeros_like(x[0])
    for t in range(len(x)):
        if segment_length and t % segment_length == 0:
            level = np.zeros_like(x[0])
        out[t] = level
        level = level + alpha * (x[t] - level)
    return out


def sleeve_features(bt: Backtest, owner: np.ndarray, num_specialists: int, max_position: float,
                    half_lives=SLEEVE_HALF_LIVES) -> np.ndarray:  # fmt: skip
    """[T, H * K], half-life-major: each specialist's unit-size sleeve return (its positions as proposed times
    the bar's returns, per 1e-3, as `MetaTracker.after_step` books them) averaged by a causal EWMA."""
    onehot = np.eye(num_specialists)[owner]
    sleeves = (bt.proposed / max_position * bt.bar_returns) @ onehot * 1e3
    return np.concatenate([causal_ewma(sleeves, h, bt.segment_length) for h in half_lives], -1)


def scaled_book(scale: torch.Tensor, bt: Backtest, cost: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-bar net return (over cash) and turnover of the book `scale * w` from the unscaled backtest `bt`
    (`scale` [T, 1] or [T, N]): a plain vectorised backtest, as `rules.pick_vol_timing` ranks its candidates
    (the book's returns `scale * w * r`, costs on its changes, each segment from flat). Differentiable."""
    w = torch.as_tensor(bt.weights, dtype=torch.float64)
    scaled = scale * w
    previous = torch.cat([torch.zeros_like(scaled[:1]), scaled[:-1]])
    starts = torch.as_tensor(np.arange(len(w)) % bt.segment_length == 0)[:, None]
    traded = (scaled - torch.where(starts, 0.0, previous)).abs()
    returns = (scaled * torch.as_tensor(bt.bar_returns, dtype=torch.float64)).sum(-1)
    return returns - (torch.as_tensor(cost, dtype=torch.float64) * traded).sum(-1), traded.sum(-1)


def scaled_sharpe(scale: torch.Tensor, bt: Backtest, cost: np.ndarray) -> torch.Tensor:
    """Per-bar Sharpe ratio (over cash) of `scaled_book`."""
    net, _ = scaled_book(scale, bt, cost)
    return net.mean() / net.std()


def turnover_per_vol(scale: torch.Tensor, bt: Backtest, cost: np.ndarray) -> torch.Tensor:
    """Turnover per unit of volatility of `scaled_book` (per bar; DESIGN 14's check compares it with
    momentum's, which `scale` 1 on momentum's backtest gives in the same units)."""
    net, traded = scaled_book(scale, bt, cost)
    return traded.mean() / net.std()


def fit_linear(features: np.ndarray, outputs: int, to_scale, bt: Backtest, cost: np.ndarray, bias: float | None = None,
               steps: int = FIT_STEPS, turnover_cap: float | None = None):  # fmt: skip
    """`(mean, std, W, b)` of the linear map `z = (x - mean) / std @ W + b` ([T, outputs]) whose book scale
    `to_scale(z)` maximises the Sharpe ratio of `bt`'s book after costs (`b` stays 0 when `bias` is None),
    less `TURNOVER_WEIGHT` x its turnover per unit of volatility's excess over `turnover_cap` (relative)."""
    mean, std = features.mean(0), features.std(0) + 1e-9
    x = torch.as_tensor((features - mean) / std, dtype=torch.float64)
    w = torch.zeros(x.shape[1], outputs, dtype=torch.float64, requires_grad=True)
    b = torch.full((outputs,), 0.0 if bias is None else bias, dtype=torch.float64, requires_grad=bias is not None)
    ascend_sharpe([w, b] if bias is not None else [w], w, lambda: to_scale(x @ w + b), bt, cost, steps, turnover_cap)
    return mean, std, w.detach().numpy(), b.detach().numpy()


def ascend_sharpe(params: list, regularised: torch.Tensor, scale, bt: Backtest, cost: np.ndarray, steps: int,
                  turnover_cap: float | None) -> None:  # fmt: skip
    """Adam on `params` (in place) for the book scale `scale()` that maximises the Sharpe ratio after costs of
    `bt`'s book (`scaled_book`), less `L2 * |regularised|^2` and `TURNOVER_WEIGHT` x its turnover per unit of
    volatility's excess over `turnover_cap` (relative; None: no penalty): the one objective of every fit here."""
    opt = FlatAdam(params, lr=0.03)  # (torch.optim would import the compiler stack)
    for _ in range(steps):
        net, traded = scaled_book(scale(), bt, cost)
        loss = -net.mean() / net.std() + L2 * (regularised**2).sum()
        if turnover_cap is not None:  # (`turnover_per_vol`)
            loss = loss + TURNOVER_WEIGHT * torch.relu(traded.mean() / net.std() / turnover_cap - 1.0)
        opt.zero_grad()
        loss.backward()
        opt.step()


def allocation_scale(appetite: np.ndarray, owner: np.ndarray):
    """The reallocated book's scale [T, N] from logits z [T, K]: the `appetite` [T] times K x each instrument's
    specialist's share `softmax(z)` (`hierarchy.compose_weights`)."""
    a, index = torch.as_tensor(appetite, dtype=torch.float64)[:, None], torch.as_tensor(owner)
    return lambda z: a * z.shape[-1] * torch.softmax(z, -1).index_select(-1, index)


def timed_scale(base: np.ndarray, owner: np.ndarray):
    """The reallocated and timed book's scale [T, N] from z [T, K + 1]: the allocation `softmax(z[:K])` as in
    `allocation_scale`, the appetite `min(1, base * exp(z[K]))` (`hierarchy.MetaTracker.rule_start`)."""
    a, index = torch.as_tensor(base, dtype=torch.float64)[:, None], torch.as_tensor(owner)
    return lambda z: (
        (a * z[:, -1:].exp()).clamp(max=1.0) * (z.shape[-1] - 1) * torch.softmax(z[:, :-1], -1).index_select(-1, index)
    )


def rule_inputs(bt: Backtest, market: MarketData, timing: dict | None, owner: np.ndarray, num_specialists: int,
                max_position: float) -> tuple[np.ndarray, np.ndarray]:  # fmt: skip
    """At `bt`'s bars: what the rule reads (`hierarchy.rule_features`) [T', F], and the volatility-managed
    rule's appetite [T'] (ones without `timing`)."""
    sleeves = sleeve_features(bt, owner, num_specialists, max_position)
    if timing is None:
        return sleeves, np.ones(len(bt.bars))
    risk = risk_features(timing, market, "cpu").numpy()[bt.bars]
    return np.concatenate([sleeves, risk[:, :-1]], -1), risk[:, -1]


def rule_book(rule: dict, features: np.ndarray, base: np.ndarray, num_specialists: int) -> tuple:
    """The allocation [T', K] and appetite [T'] a stored rule gives from `rule_inputs`' output: where the
    meta-controller's zero action trades (`hierarchy.MetaTracker.start_point`)."""
    z = (features - np.array(rule["mean"])) / np.array(rule["std"]) @ np.array(rule["weights"])
    z = torch.as_tensor(z + np.array(rule.get("bias", 0.0)))
    appetite = base if not rule.get("timed") else np.minimum(1.0, base * np.exp(z[:, num_specialists].numpy()))
    return torch.softmax(z[:, :num_specialists], -1).numpy(), appetite


def fit_allocation_rule(specialists, train: MarketData, cfg: Config, timing: dict | None, device="cpu",
                        segments: int = 8) -> dict:  # fmt: skip
    """The allocation rule of `specialists` fit on the training split `train` (module docstring): the equal
    allocation backtested there (`segments` pieces), its book reallocated and, with `timing`
    (`hierarchy.timing_spec`), scaled by the volatility-managed rule's appetite times the fitted factor (None:
    full appetite, no factor). Returns what the meta-controller stores (`nets.MetaController(allocation_rule=...)`):
    the half-lives, `timed`, `mean`, `std`, `weights`, `bias` and the training split's Sharpe ratio of the
    book before and after (`equal_sharpe`: the start without the rule; `fit_sharpe`; per year)."""
    if train.split != "train":
        raise ValueError(f"the allocation rule is fit on the training split only, got {train.split!r}")
    k, size = len(specialists.names), cfg.environment.max_position_size
    owner = instrument_specialist_index(train.sectors, specialists.names)
    momentum = torch.as_tensor(momentum_positions(train.prices), dtype=torch.float32, device=device)
    policies = {
        "equal_allocation": lambda rows: HierarchyPolicy(specialists, None, owner, size, rows, device),
        "momentum": lambda rows: RulePolicy(momentum, size, specialists.position_rate),
    }
    ran = run_backtests(train, cfg, policies, segments, device)
    bt = ran["equal_allocation"]
    cost = cost_rates(train, cfg, "cpu").double().numpy()
    owner = owner.numpy()
    features, base = rule_inputs(bt, train, timing, owner, k, size)
    timed = timing is not None
    to_scale = timed_scale(base, owner) if timed else allocation_scale(base, owner)
    outputs = k + 1 if timed else k
    # DESIGN 14: no more turnover per unit of volatility than momentum's, measured the same way on train
    cap = float(turnover_per_vol(torch.ones(1, 1, dtype=torch.float64), ran["momentum"], cost))
    mean, std, weights, bias = fit_linear(features, outputs, to_scale, bt, cost, bias=0.0 if timed else None,
                                          turnover_cap=cap)  # fmt: skip
    rule = {"half_lives": list(SLEEVE_HALF_LIVES), "timed": timed, "mean": mean.tolist(), "std": std.tolist(),
            "weights": weights.tolist(), "bias": bias.tolist()}  # fmt: skip
    per_year = float(np.sqrt(train.bars_per_year))

    def book(allocation, appetite):  # the book of `allocation` [T', K] and `appetite` [T'] on train
        scale = torch.as_tensor(appetite[:, None] * k * allocation[:, owner], dtype=torch.float64)
        return float(scaled_sharpe(scale, bt, cost)) * per_year, float(turnover_per_vol(scale, bt, cost)) / cap

    (equal, _), (fit, turnover) = (
        book(np.full((len(base), k), 1.0 / k), base),
        book(*rule_book(rule, features, base, k)),
    )
    return {**rule, "equal_sharpe": equal, "fit_sharpe": fit, "turnover_vs_momentum": turnover}


SIZING_STEPS = 200
"""Adam steps of the joint sizing's fit: eight parameters from 0 (seed 1's factors on the built-in market within
0.004 of 600 steps' in 200, at 4 ms a step over the training split's 20,000 bars)."""


def start_backtests(specialists, meta, train: MarketData, cfg: Config, device="cpu", segments: int = 8,
                    momentum: bool = True, tables=None) -> dict:  # fmt: skip
    """The hierarchy `specialists` + `meta` (`system`) and, unless `momentum` is False, momentum backtested on the
    training split `train` (`segments` pieces; `tables`: its `build_tables`, built here if None): what Phase 3 fits
    its joint sizing from, checks an iterate against (`selection.holds_on_train`), and Phases 2 and 3 set their
    reward's moments from (the meta-controller's mean action is its start)."""
    if train.split != "train":
        raise ValueError(f"a phase's start is measured on the training split only, got {train.split!r}")
    size = cfg.environment.max_position_size
    owner = instrument_specialist_index(train.sectors, specialists.names).to(device)
    policies = {"system": lambda rows: HierarchyPolicy(specialists, meta, owner, size, rows, device, train)}
    if momentum:
        book = torch.as_tensor(momentum_positions(train.prices), dtype=torch.float32, device=device)
        policies["momentum"] = lambda rows: RulePolicy(book, size, specialists.position_rate)
    return run_backtests(train, cfg, policies, segments, device, tables)


def fit_joint_sizing(ran: dict, train: MarketData, cfg: Config, steps: int = SIZING_STEPS) -> dict:
    """Phase 3's joint sizing of a hierarchy, fit on the training split `train` from its backtests there `ran`
    (`start_backtests`): a factor `s_i = exp(u_i)` per instrument on the specialists' positions in the composed
    book (`hierarchy.compose_weights`, `nets.MetaController(instrument_scale=...)`).

    Why: neither level can size two instruments of different specialists against each other. A specialist trades
    its own sector as if nobody else held its bets; the meta-controller scales whole specialists. Where two sectors
    carry one bet (an index future and a currency on one driver), the book holds it twice; a smaller position in
    each is what the portfolio needs (`tests/test_phase3.py`, the cross-sector test). PPO did not find it from its
    rewards (that test's docstring), so Phase 3 fits it the way Phase 2 fits its start (module docstring): `u`
    maximises the training split's Sharpe ratio after costs of the hierarchy's executed book scaled per instrument
    (`scaled_book`: the vectorised backtest, so the risk manager's and the position cap's response to the new
    sizes is left out), less the L2 penalty `L2 * |u|^2` and `TURNOVER_WEIGHT` x the turnover per unit of
    volatility's excess over the larger of momentum's and the hierarchy's own (a smaller position in a volatile
    instrument trades the same for less volatility; DESIGN 14 asks for no more than momentum's). Phase 3 keeps it
    only where its validation backtest beats the start with confidence (`phase3_joint.py`).

    Returns `scale` [N] (the market's order) and the training split's Sharpe ratio (per year) and turnover per
    unit of volatility over momentum's, before and after."""
    bt, cost = ran["system"], cost_rates(train, cfg, "cpu").double().numpy()
    one = torch.ones(1, 1, dtype=torch.float64)
    momentum_turnover = float(turnover_per_vol(one, ran["momentum"], cost))
    cap = max(momentum_turnover, float(turnover_per_vol(one, bt, cost)))
    u = torch.zeros(1, train.num_instruments, dtype=torch.float64, requires_grad=True)
    ascend_sharpe([u], u, u.exp, bt, cost, steps, cap)
    scale = u.detach().exp()
    per_year = float(np.sqrt(train.bars_per_year))

    def book(s):  # Sharpe per year and turnover per unit of volatility over momentum's, on train
        return float(scaled_sharpe(s, bt, cost)) * per_year, float(turnover_per_vol(s, bt, cost)) / momentum_turnover

    (before, turnover_before), (after, turnover_after) = book(one), book(scale)
    return {"scale": scale[0].tolist(), "symbols": list(train.symbols), "train_sharpe": [before, after],
            "turnover_vs_momentum": [turnover_before, turnover_after]}  # fmt: skip
