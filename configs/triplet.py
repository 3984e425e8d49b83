"""The paper's Triplet Network baseline: batch 32, Adam 8e-4 fixed, random negatives for the
first 3 epochs then semi-hard negatives; singletons kept as negatives."""

from leopard_jax.config import load_config


def get_config():
    c = load_config(__file__, "default.py")
    c.loss.name = "triplet"
    c.batch_size = 32
    c.keep_singletons = True
    c.optim.learning_rate = 8e-4
    c.optim.decay_factor = 1.0  # fixed learning rate
    c.num_epochs = 160
    return c
