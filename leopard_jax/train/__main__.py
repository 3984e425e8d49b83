"""python -m leopard_jax.train --config configs/default.py --workdir W [--config.key=value]

Trains the embedding network data-parallel over all local devices, evaluates on held-out
individuals, keeps checkpoints in W and exports the best model to W/best_model for `embed`.
Rerunning the same command with the same workdir resumes where the last run stopped.
The loop itself is `leopard_jax.train.loop.train_and_evaluate`.
"""

from __future__ import annotations

import sys

from absl import app, flags, logging
from ml_collections import config_flags

_CONFIG = config_flags.DEFINE_config_file(
    "config", None, "Path to a config file (configs/*.py).", lock_config=True
)
_WORKDIR = flags.DEFINE_string(
    "workdir", None, "Directory for checkpoints, logs and the exported model."
)


def main(argv: list[str]) -> int | None:
    if len(argv) > 1:
        print(f"error: unexpected arguments {argv[1:]}; see --help", file=sys.stderr)
        return 2
    if _CONFIG.value is None or _WORKDIR.value is None:
        print("error: --config and --workdir are required; see --help", file=sys.stderr)
        return 2
    logging.set_verbosity(logging.WARNING)  # orbax logs every file it writes at INFO
    from leopard_jax.config import ConfigError
    from leopard_jax.train import TrainingError, loop

    try:
        loop.train_and_evaluate(_CONFIG.value, _WORKDIR.value)
    except (ConfigError, TrainingError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return None


if __name__ == "__main__":
    app.run(main)
