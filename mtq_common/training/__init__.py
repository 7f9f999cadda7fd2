"""Training plumbing, the bottom room: every other room may import it, it imports none of them.

* `config.py`: the typed configuration (dataclasses with their defaults, `Config.hash`);
* `settings.py`: reading and checking it (the YAML file, `validate`, the command-line flags over the file);
* `checkpoint.py`: checkpoint files (atomic writes, `weights_only` loads, RNG states, config checks);
* `distributed.py`: ranks under `torchrun` (a no-op without it) and the device choice;
* `plumbing.py`: a phase script's run (logging, threads, seeding, the rotating `latest.pt`, TensorBoard,
  the progress bar, `--stop-after`, timing).
"""
