"""The engine both environments share: B rows of held instruments, their episodes, the stop-loss, the
portfolio step (`kernels.portfolio_step`) and the observations (DESIGN section 4). `envs.py` wraps it in
the Gymnasium vector API; nothing here loops over rows or instruments.
"""

from __future__ import annotations

import torch

import kernels
from mtq_common.data.tables import OBS_CLIP, STATE_SIZE, MarketTables
from mtq_common.training.config import Config

TIME_IN_TRADE_SCALE = 100.0

POSITION_RATE = 0.3
"""The execution's default partial-adjustment rate (Phase 1's `--position-rate`; the rate a run's specialists
were trained with is stored with their weights, and every policy of an evaluation trades at that rate)."""


def partial_adjustment(previous: torch.Tensor, target: torch.Tensor, rate: float) -> torch.Tensor:
    """The execution of a target book, the same for every policy (DESIGN section 4): the own position moves
    towards the target by `rate` each bar, `p_t = p_(t-1) + rate * (target_t - p_(t-1))`, from the own
    position `p_(t-1)` the observation carries (0 while a stop-loss holds it flat). Rate 1 trades the target.

    Why: per-bar jitter of a policy (exploration noise, a rule's flip-flops near its threshold) then moves
    the book by only a fraction, which cuts the turnover that costs eat, while a lasting change of the
    target still arrives within a few bars."""
    if rate == 1.0:
        return target
    return previous + rate * (target - previous)


def drift(weights: torch.Tensor, returns: torch.Tensor, net_return: torch.Tensor) -> torch.Tensor:
    """Weights after a bar: each holding grows with its instrument, equity with the account's net return.

    `w_i (1 + r_i) / (1 + net)` is what the book holds at the next bar's close before any trade, so the
    next step's cost is charged on the trade actually needed (DESIGN section 4)."""
    return weights * (1.0 + returns) / (1.0 + net_return)


# ---------------------------------------------------------------------------------------------
# The shared engine: episode bookkeeping, stop-loss, portfolio step
# ---------------------------------------------------------------------------------------------


class TradingEngine:
    """State and mechanics shared by both environments: B rows, each holding `n` instruments.

    `instrument_index` [B, n] says which market column each held slot is (the specialist env has
    n = 1 and a different instrument per row; the portfolio env holds all N columns in every row).

    Two books per row:
    * the **executed book** `weights` [B, n]: what the account holds, as fractions of equity after the
      last bar's returns (positions drift with their instruments between bars, so the cost of the next
      step is charged on `|w_new - weights|`, the trade actually needed); it earns the reward;
    * the **own book** `own` [B, n] in [-1, 1]: each slot's own position as its policy asked for it
      (after the stop-loss), in units of `max_position`. A specialist observes this one, and the
      stop-loss, entry price and time in trade follow it, so that a specialist's observation is the
      same whether it trades alone (`SpecialistEnv`) or under a meta-controller and the risk manager
      (`PortfolioEnv`), which only scale its trade. `own_equity`/`own_peak` account for the own position
      held at full size (the specialist's own account; its drawdown is an observation).
    """

    def __init__(self, tables: MarketTables, cfg: Config, instrument_index: torch.Tensor, seed: int, device):
        env = cfg.environment
        self.tables, self.cfg, self.device = tables, cfg, torch.device(device)
        self.index = instrument_index.to(self.device)  # [B, n]
        self.num_rows, self.n = self.index.shape
        self.num_instruments = tables.prices.shape[1]
        # Every row holding every instrument in market order (the portfolio env): gather whole bars.
        self.holds_all = self.n == self.num_instruments and bool(
            (self.index == torch.arange(self.n, device=self.device)).all()
        )
        self.episode_length = env.episode_length
        self.max_position = env.max_position_size
        self.stop_loss = env.stop_loss_pct
        self.reward_params = kernels.RewardParams.from_config(cfg.reward, tables.bars_per_year)
        self.generator = torch.Generator(device=self.device)
        self.generator.manual_seed(seed)
        zeros = torch.zeros(self.num_rows, device=self.device)
        zeros_n = torch.zeros(self.num_rows, self.n, device=self.device)
        self.t = torch.zeros(self.num_rows, dtype=torch.long, device=self.device)
        self.steps = torch.zeros_like(self.t)
        self.weights, self.own, self.own_held = zeros_n.clone(), zeros_n.clone(), zeros_n.clone()
        self.entry, self.locked, self.time_in_trade = zeros_n.clone(), zeros_n.clone(), zeros_n.clone()
        self.own_equity, self.own_peak = zeros_n.clone(), zeros_n.clone()
        self.equity, self.peak, self.ema_a, self.ema_b, self.ema_down, self.drawdown = (zeros.clone() for _ in range(6))
        self.episode_return = zeros.clone()

    def gather(self, table: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """`table[t[b], index[b, j]]` for every row b and held slot j: [T, N, ...] -> [B, n, ...].

        One `index_select` on the flattened table: much faster on the CPU than advanced indexing; when
        every row holds every instrument, one `index_select` of whole bars (longer rows copy faster).
        """
        if self.holds_all:
            return table.index_select(0, t)
        flat = table.reshape(-1, *table.shape[2:])
        rows = (t.unsqueeze(-1) * self.num_instruments + self.index).reshape(-1)
        return flat.index_select(0, rows).reshape(self.num_rows, self.n, *table.shape[2:])

    STATE = (
        "t", "steps", "weights", "own", "own_held", "entry", "locked", "time_in_trade", "own_equity", "own_peak",
        "equity", "peak", "ema_a", "ema_b", "ema_down", "drawdown", "episode_return",
    )  # fmt: skip

    def state_dict(self) -> dict:
        """Every per-row tensor and the start generator: what an exact resume needs."""
        state = {name: getattr(self, name).clone() for name in self.STATE}
        state["generator"] = self.generator.get_state()
        return state

    def load_state_dict(self, state: dict) -> None:
        for name in self.STATE:
            if name not in state:
                raise ValueError(f"environment state has no {name!r}: it was saved by an older version")
            if state[name].shape != getattr(self, name).shape:
                raise ValueError(
                    f"environment state {name!r} has shape {tuple(state[name].shape)}, "
                    f"expected {tuple(getattr(self, name).shape)} (another --num-envs?)"
                )
            setattr(self, name, state[name].to(self.device))
        self.generator.set_state(state["generator"])

    # -- reset --------------------------------------------------------------------------------
    def seed(self, seed: int) -> None:
        self.generator.manual_seed(seed)

    def random_starts(self) -> torch.Tensor:
        """A start bar for every row: after the warm-up window, at least two bars before the end."""
        low, high = self.tables.first_bar, self.tables.num_bars - 1
        return torch.randint(low, high, (self.num_rows,), generator=self.generator, device=self.device)

    def reset_rows(self, mask: torch.Tensor, starts: torch.Tensor) -> None:
        """Reset the rows where `mask` is True to fresh episodes starting flat at `starts` (branch-free)."""
        m, m_n = mask, mask.unsqueeze(-1)
        self.t = torch.where(m, starts, self.t)
        self.steps = torch.where(m, 0, self.steps)
        zero = torch.zeros((), device=self.device)
        one = torch.ones((), device=self.device)
        for name in ("weights", "own", "own_held", "locked", "time_in_trade"):
            setattr(self, name, torch.where(m_n, zero, getattr(self, name)))
        self.own_equity = torch.where(m_n, one, self.own_equity)
        self.own_peak = torch.where(m_n, one, self.own_peak)
        self.entry = torch.where(m_n, self.gather(self.tables.prices, starts), self.entry)
        self.equity = torch.where(m, one, self.equity)
        self.peak = torch.where(m, one, self.peak)
        self.drawdown = torch.where(m, zero, self.drawdown)
        # Reward moments start from the variance a full-size position would have had (the causal EWMA
        # at the start bar): the differential Sharpe is then well scaled from the first bar.
        variance = self.gather(self.tables.variance, starts)  # [B, n] per-bar variances
        b0 = (self.max_position**2) * variance.mean(-1).clamp_min(1e-12)
        self.ema_a = torch.where(m, zero, self.ema_a)
        self.ema_b = torch.where(m, b0, self.ema_b)
        self.ema_down = torch.where(m, 0.5 * b0, self.ema_down)
        self.episode_return = torch.where(m, zero, self.episode_return)

    # -- step ---------------------------------------------------------------------------------
    def stop_lock(self, own: torch.Tensor, update: bool = True) -> torch.Tensor:
        """Slots held flat [B, n]: stopped out, and the policy still asks for the stopped trade's sign.

        A lock ends once the policy asks for another sign (flat counts); `update=False` only looks."""
        same = (torch.sign(own) == self.locked) & (self.locked != 0)
        if update:
            self.locked = torch.where(same, self.locked, torch.zeros_like(self.locked))
        return same

    def advance(self, weights: torch.Tensor, own: torch.Tensor, var_usage: torch.Tensor, cost_rate: torch.Tensor,
                score: bool = True):  # fmt: skip
        """Hold `weights` [B, n] (own book `own`) over bar t -> t+1: accounts, stop-loss, reward, truncation.
        `score=False` books the accounts alone: the reward is 0 and its moving moments stay as they were."""
        tb = self.tables
        t_next = self.t + 1
        ret = self.gather(tb.returns, t_next)
        if score:
            out = kernels.portfolio_step(
                weights,
                self.weights,
                ret,
                cost_rate,
                self.equity,
                self.peak,
                self.ema_a,
                self.ema_b,
                self.ema_down,
                var_usage,
                self.reward_params,
            )
        else:
            _, cost, net, equity, peak, drawdown = kernels.portfolio_accounts(
                weights, self.weights, ret, cost_rate, self.equity, self.peak, self.reward_params.risk_free_per_bar
            )
            out = kernels.PortfolioStepOut(net, cost, equity, peak, drawdown, self.ema_a, self.ema_b, self.ema_down,
                                           torch.zeros_like(net))  # fmt: skip
        # The own account: each slot's own position at full size, accounted like a one-instrument book.
        own_weights = own * self.max_position
        own_net = (
            self.reward_params.risk_free_per_bar + own_weights * ret - cost_rate * (own_weights - self.own_held).abs()
        )
        self.own_equity = self.own_equity * (1.0 + own_net)
        self.own_peak = torch.maximum(self.own_peak, self.own_equity)
        self.own_held = drift(own_weights, ret, own_net)

        # A new trade (sign change into a position) enters at bar t's close; the stop follows the own book.
        price_now = self.gather(tb.prices, self.t)
        price_next = self.gather(tb.prices, t_next)
        side = torch.sign(own)
        new_trade = (side != torch.sign(self.own)) & (side != 0)
        self.entry = torch.where(new_trade, price_now, self.entry)
        self.time_in_trade = torch.where(side == 0, 0.0, torch.where(new_trade, 1.0, self.time_in_trade + 1.0))
        adverse = -side * (price_next / self.entry - 1.0)
        stopped = (side != 0) & (adverse > self.stop_loss)
        self.locked = torch.where(stopped, side, self.locked)

        self.own = own
        self.weights = drift(weights, ret, out.net_return.unsqueeze(-1))
        self.equity, self.peak, self.drawdown = out.equity, out.peak, out.drawdown
        self.ema_a, self.ema_b, self.ema_down = out.ema_a, out.ema_b, out.ema_down
        self.t, self.steps = t_next, self.steps + 1
        self.episode_return = self.episode_return + out.reward
        truncated = (self.steps >= self.episode_length) | (self.t >= tb.num_bars - 1)
        return out, stopped, truncated

    def instrument_obs(self, diagnostic: bool) -> torch.Tensor:
        """Per held slot: features, instrument one-hot, and the own book's position, unrealised PnL (in
        stop distances), own-account drawdown (over the drawdown target) and time in trade."""
        tb = self.tables
        prices = self.gather(tb.prices, self.t)
        unrealised = torch.sign(self.own) * (prices / self.entry - 1.0) / self.stop_loss  # in stop distances
        own_drawdown = 1.0 - self.own_equity / self.own_peak
        state = [
            self.own,
            unrealised,
            own_drawdown / self.cfg.reward.max_drawdown_target,
            self.time_in_trade / TIME_IN_TRADE_SCALE,
        ]
        if diagnostic:
            t_next = (self.t + 1).clamp_max(tb.num_bars - 1)
            daily = self.gather(tb.variance, self.t).sqrt().clamp_min(1e-8)
            state.append(self.gather(tb.returns, t_next) / daily)
        # One gather yields a fresh [B, n, F + N + STATE] block (features, one-hot, zero state columns);
        # writing the few state columns into it is far cheaper than concatenating along the last axis.
        # Features are already clipped and the one-hot is bounded: only the state needs the clip.
        out = self.gather(tb.instrument_static, self.t)
        state = torch.stack(state, -1).clamp(-OBS_CLIP, OBS_CLIP)
        if diagnostic:
            return torch.cat([out[..., :-STATE_SIZE], state], -1)  # a test aid: speed does not matter
        out[..., -STATE_SIZE:] = state
        return out

    def fresh_instrument_obs(self, rows: torch.Tensor) -> torch.Tensor:
        """`instrument_obs` of `rows` when flat at their current bar: the static columns, zero state."""
        static = self.tables.instrument_static
        if self.holds_all:
            return static.index_select(0, self.t[rows])
        flat = static.reshape(-1, static.shape[-1])
        index = (self.t[rows].unsqueeze(-1) * self.num_instruments + self.index[rows]).reshape(-1)
        return flat.index_select(0, index).reshape(len(rows), self.n, -1)
