"""`python -m leopard_jax.preprocess --input PHOTOS --output DATASET_DIR --detector md_v5a.onnx`.

--input is a folder of identity folders (or of unlabelled photos), a CSV (`path,identity[,flank]`
or the wildlife-datasets table with `bbox` and `viewpoint`), or a COCO .json with `--images DIR`
(annotated boxes are cropped; no detector needed). `--shard I/N` runs part I of N, e.g. as a
cluster job array into one --output. Any setting can also come from a config file and be
overridden one by one:
`--config configs/preprocess.py --config.edges.canny_low=40 --config.render.mode=letterbox`.
The short flags below override the config file.

This command keeps absl's global flags and app.run (unlike leopard_jax.cli): config_flags
reads its --config.* overrides from sys.argv and defines them on first parse, which a
per-command FlagValues parsed again in one process cannot follow. Errors read as cli.run's.
"""

import pathlib
import sys

from absl import app, flags
from ml_collections import config_flags

from leopard_jax.preprocess import config as default_config
from leopard_jax.preprocess import inputs, pipeline

_PROG = "python -m leopard_jax.preprocess"
_CONFIG = config_flags.DEFINE_config_file(
    "config",
    str(pathlib.Path(default_config.__file__)),
    "settings file (get_config()); see configs/preprocess.py",
)
_INPUT = flags.DEFINE_string(
    "input",
    None,
    "identity folders, unlabelled folder, CSV (path,identity[,flank] or "
    "image_id,identity,path,bbox,viewpoint) or COCO .json",
)
_IMAGES = flags.DEFINE_string(
    "images",
    None,
    "folder of a COCO file's images (default: X.coco/images/<split> beside "
    "X.coco/annotations/instances_<split>.json) or of a CSV's relative paths",
)
_OUTPUT = flags.DEFINE_string("output", None, "dataset folder to write; rerunning resumes it")
_DETECTOR = flags.DEFINE_string(
    "detector",
    None,
    "ONNX detector file (MegaDetector v5, ultralytics, YOLOX) or 'none'; "
    "not needed when every item has an annotated box",
)
_BACKGROUND = flags.DEFINE_string(
    "background", None, "rembg model name (u2netp, u2net...), a local .onnx, or 'none'"
)
_LABELS = flags.DEFINE_enum(
    "labels", None, ["auto", "folders", "none"], "identity folders or unlabelled photos"
)
_WORKERS = flags.DEFINE_integer(
    "workers", None, "worker processes (0: one per core; -1: in this process)"
)
_SHARD = flags.DEFINE_string(
    "shard",
    None,
    "I/N: process part I of N (every N-th item), e.g. one task of a job array; "
    "all N parts write into the same --output",
)


def settings_from_flags():
    config = _CONFIG.value
    overrides = {
        ("input",): _INPUT.value,
        ("images",): _IMAGES.value,
        ("output",): _OUTPUT.value,
        ("detector", "model"): _DETECTOR.value,
        ("background", "model"): _BACKGROUND.value,
        ("labels",): _LABELS.value,
        ("workers",): _WORKERS.value,
        ("shard",): _SHARD.value,
    }
    with config.unlocked():
        for path, value in overrides.items():
            if value is not None:
                target = config
                for part in path[:-1]:
                    target = target[part]
                target[path[-1]] = value
    return config


def parse_flags(argv: list[str]) -> list[str]:
    """absl's parse with cli.run's manners: --help lists every flag and exits 0; a bad flag
    is one line and exit 2."""
    if {"--help", "-h", "--helpfull"} & set(argv[1:]):
        print(f"{__doc__.strip()}\n\nflags:\n{flags.FLAGS.main_module_help()}")
        sys.exit(0)
    try:
        return flags.FLAGS(argv)
    except flags.Error as e:
        print(f"error: {e}; see {_PROG} --help", file=sys.stderr)
        sys.exit(2)


def main(argv: list[str]) -> None:
    if len(argv) > 1:
        print(
            f"error: unexpected arguments {argv[1:]}; settings are flags, e.g. --input DIR",
            file=sys.stderr,
        )
        sys.exit(2)
    try:
        summary = pipeline.run(settings_from_flags())
    except (pipeline.PreprocessError, inputs.InputError) as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        print(
            "interrupted: finished photos are saved; rerun the same command to resume",
            file=sys.stderr,
        )
        sys.exit(130)
    print(summary.line(str(_OUTPUT.value or _CONFIG.value.output)), file=sys.stderr)
    sys.exit(0 if summary.ok else 1)


if __name__ == "__main__":
    app.run(main, flags_parser=parse_flags)
