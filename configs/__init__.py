"""Training and preprocessing configs, importable as modules (as big_vision's).

Each file has `get_config()`; pass it as `--config configs/NAME.py` and override single
values with `--config.key=value`. A derived config imports its base:
`from configs import default`.
"""
