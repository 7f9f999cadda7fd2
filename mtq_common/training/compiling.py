"""Inductor's options for every `torch.compile` of the project, in one place (the updates in
`mtq_common.agents.update`, the environments' steps, Phases 2 and 3's rollout bars)."""

from __future__ import annotations

import torch


def compile_options(device: str | torch.device, narrow_vectors: bool = False) -> dict:
    """`torch.compile(fn, options=...)` for a function that runs on `device`.

    On the CPU, `cpp_wrapper`: the compiled graph calls its kernels and matmuls from generated C++ instead of
    Python. A bar or a minibatch is a few dozen small calls, so the Python wrapper's per-call work counted (a
    default Phase 3, 40 iterations, alternated: 35.0 / 35.4 -> 33.3 / 33.4 s); a cold Inductor cache compiles
    about 6 s longer. `narrow_vectors` on an AVX-512 CPU: 256-bit vectors (`cpp.simdlen`), for the environments,
    whose rows of 8 instruments then fill one vector where 16 lanes would be half masked (a `PortfolioEnv` step at
    4,096 rows, one thread: 3.73-4.12 -> 3.25-3.46 ms). Other devices keep Inductor's defaults."""
    if torch.device(device).type != "cpu":
        return {}
    options = {"cpp_wrapper": True}
    if narrow_vectors and torch.backends.cpu.get_cpu_capability() == "AVX512":
        options["cpp.simdlen"] = 256
    return options
