"""Preprocessing settings: copy this file to change several at once, or override one at a time.

    python -m leopard_jax.preprocess --config configs/preprocess.py \
        --input photos/ --output data/leopards --detector md_v5a.0.0.onnx \
        --config.background.model=u2net --config.edges.canny_low=55

The defaults and what each setting means live in leopard_jax/preprocess/config.py.
"""

from leopard_jax.preprocess.config import get_config  # noqa: F401
