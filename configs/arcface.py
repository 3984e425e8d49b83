"""ArcFace (additive angular margin) on the same backbone and data."""

from leopard_jax.config import load_config


def get_config():
    c = load_config(__file__, "default.py")
    c.loss.name = "arcface"
    c.loss.margin = 0.5
    return c
