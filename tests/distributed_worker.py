"""One process of the two-process training test: trains, then writes its parameters.

usage: distributed_worker.py WORKDIR OUT.npz --config C [--config.key=value ...]
"""

import sys

import numpy as np
from absl import app
from flax import traverse_util

from leopard_jax import train  # defines the --config flag


def main(argv):
    workdir, out = argv[1], argv[2]
    _, state = train.train_and_evaluate(train._CONFIG.value, workdir)
    flat = traverse_util.flatten_dict(state.params, sep="/")
    np.savez(out, **{k: np.asarray(v) for k, v in flat.items()})


if __name__ == "__main__":
    app.run(main, argv=sys.argv)
