"""The paper's Triplet Network baseline: batch 32, Adam 8e-4 fixed, random negatives for the
first 3 epochs then semi-hard negatives; singletons kept as negatives."""

from configs import default


def get_config():
    c = default.get_config()
    c.loss.name = "triplet"
    c.batch_size = 32
    c.keep_singletons = True
    c.optim.learning_rate = 8e-4
    c.optim.decay_factor = 1.0  # fixed learning rate
    c.num_epochs = 160
    return c
