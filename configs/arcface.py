"""ArcFace (additive angular margin) on the same backbone and data."""

from configs import default


def get_config():
    c = default.get_config()
    c.loss.name = "arcface"
    c.loss.margin = 0.5
    return c
