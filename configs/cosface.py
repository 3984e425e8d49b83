"""Plain CosFace (constant margin, h = 1): the paper's comparison to the adaptive margin."""

from leopard_jax.config import load_config


def get_config():
    c = load_config(__file__, "default.py")
    c.loss.margin_fn = "constant"
    return c
