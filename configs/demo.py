"""Tiny, CPU, a few minutes: EfficientNetV2-B0 at 64×128 on the synthetic demo dataset that
`make demo` builds (demo_out/dataset)."""

import os

from configs import default

_REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def get_config():
    c = default.get_config()
    c.data_dir = os.path.join(_REPO, "demo_out", "dataset")
    c.num_epochs = 20  # 340 steps: held-out DT5AP levels off after ~15 epochs
    c.batch_size = 32
    c.workers = 0
    c.model.backbone = "efficientnetv2_b0"
    c.model.dims = 128
    c.model.drop_path_rate = 0.0  # 0.2 slowed fitting here and lowered held-out DT5AP
    c.loss.scale = 16.0  # few classes: a smaller scale keeps early gradients sane
    c.loss.margin = 0.2
    # The optimiser is the paper's as it is (default.py: Adam 1e-3, ×0.7 every 5 epochs): 2e-3
    # fitted the training individuals more slowly, and with 5e-3 held-out DT5AP fell below the
    # untrained model's.
    c.eval.batch_size = 32
    c.eval.every_epochs = 5  # held-out evaluation costs ~1 s; the last epoch is always evaluated
    return c
