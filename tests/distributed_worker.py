"""One process of the two-process training test: trains, then writes its parameters.

usage: distributed_worker.py WORKDIR OUT.npz --config C [--config.key=value ...]
"""

import sys

import numpy as np
from absl import app
from flax import traverse_util
from ml_collections import config_flags

from leopard_jax.train import loop

_CONFIG = config_flags.DEFINE_config_file("config", None, "config file", lock_config=True)


def main(argv):
    workdir, out = argv[1], argv[2]
    outcome = loop.train_and_evaluate(_CONFIG.value, workdir)
    flat = traverse_util.flatten_dict(outcome.state.params, sep="/")
    np.savez(out, **{k: np.asarray(v) for k, v in flat.items()})


if __name__ == "__main__":
    app.run(main, argv=sys.argv)
