"""Tiny, CPU, a few minutes: EfficientNetV2-B0 at 64×128 on the synthetic demo dataset that
`make demo` builds (demo_out/dataset)."""

import os

from leopard_jax.config import load_config

_REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def get_config():
    c = load_config(__file__, "default.py")
    c.data_dir = os.path.join(_REPO, "demo_out", "dataset")
    c.num_epochs = 30
    c.batch_size = 32
    c.workers = 0
    c.model.backbone = "efficientnetv2_b0"
    c.model.dims = 128
    c.model.drop_path_rate = 0.0
    c.loss.scale = 16.0  # few classes: a smaller scale keeps early gradients sane
    c.loss.margin = 0.2
    c.optim.learning_rate = 2e-3
    c.optim.decay_every_epochs = 10
    c.eval.batch_size = 32
    c.eval.every_epochs = 5  # held-out evaluation costs ~2 s; the last epoch is always evaluated
    return c
