"""Plain CosFace (constant margin, h = 1): the paper's comparison to the adaptive margin."""

from configs import default


def get_config():
    c = default.get_config()
    c.loss.margin_fn = "constant"
    return c
