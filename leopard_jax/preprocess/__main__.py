"""`python -m leopard_jax.preprocess --input PHOTOS --output DATASET_DIR --detector md_v5a.onnx`.

Any setting can also come from a config file and be overridden one by one:
`--config configs/preprocess.py --config.edges.canny_low=40 --config.render.mode=letterbox`.
The short flags below override the config file.
"""

import pathlib
import sys

from absl import app, flags
from ml_collections import config_flags

from leopard_jax.preprocess import config as default_config
from leopard_jax.preprocess import inputs, pipeline

_CONFIG = config_flags.DEFINE_config_file(
    "config", str(pathlib.Path(default_config.__file__)), "settings file (get_config()); see configs/preprocess.py"
)
_INPUT = flags.DEFINE_string("input", None, "folder of <identity>/<photo>, unlabelled folder, or CSV path,identity[,flank]")
_OUTPUT = flags.DEFINE_string("output", None, "dataset folder to write; rerunning resumes it")
_DETECTOR = flags.DEFINE_string("detector", None, "ONNX detector file (MegaDetector v5, ultralytics, YOLOX) or 'none'")
_BACKGROUND = flags.DEFINE_string("background", None, "rembg model name (u2netp, u2net...), a local .onnx, or 'none'")
_LABELS = flags.DEFINE_enum("labels", None, ["auto", "folders", "none"], "identity folders or unlabelled photos")
_WORKERS = flags.DEFINE_integer("workers", None, "worker processes (0: one per core; -1: in this process)")


def settings_from_flags():
    config = _CONFIG.value
    overrides = {
        ("input",): _INPUT.value,
        ("output",): _OUTPUT.value,
        ("detector", "model"): _DETECTOR.value,
        ("background", "model"): _BACKGROUND.value,
        ("labels",): _LABELS.value,
        ("workers",): _WORKERS.value,
    }
    with config.unlocked():
        for path, value in overrides.items():
            if value is not None:
                target = config
                for part in path[:-1]:
                    target = target[part]
                target[path[-1]] = value
    return config


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments {argv[1:]}; settings are flags, e.g. --input DIR")
    try:
        summary = pipeline.run(settings_from_flags())
    except (pipeline.PreprocessError, inputs.InputError) as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        print("interrupted: finished photos are saved; rerun the same command to resume", file=sys.stderr)
        sys.exit(130)
    print(summary.line(str(_OUTPUT.value or _CONFIG.value.output)), file=sys.stderr)
    sys.exit(0 if summary.ok else 1)


if __name__ == "__main__":
    app.run(main)
