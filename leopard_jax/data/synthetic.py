"""Synthetic camera-trap photos of spotted animals: the project's built-in demo data.

Each animal owns two fixed random coats (left and right flank), drawn once in a
canonical side-view frame: rosettes (broken rings around a darker centre) on the body,
solid spots on head, legs and belly. A photo warps that coat through a random
perspective pose into a cluttered scene, then varies leg/tail pose, lighting (day, flash,
IR-grey), exposure, vignetting, occlusion by vegetation, blur and sensor noise — so the
coat is the only thing that identifies the animal, and raw pixels mostly do not.

Output is a folder per identity, `<animal>_<flank>/<n>.jpg` (one identity per flank, as
spotID's folders), ready for `python -m leopard_jax.preprocess`. `write_records_dataset`
skips preprocessing and writes a dataset directory directly, for tests.
Everything is deterministic for a seed: every image has its own generator seeded by
(seed, animal, flank[, photo]).

    python -m leopard_jax.data.synthetic --out photos/ --identities 40 --images-per-identity 8
"""

from __future__ import annotations

import os
import pathlib
import sys
from collections.abc import Iterator

import cv2
import numpy as np
from absl import flags

from leopard_jax import cli
from leopard_jax.data import synthetic_scene as scene

FLANKS = ("left", "right")


def identity_names(identities: int) -> list[tuple[str, int, str]]:
    """(identity, animal, flank) for the first `identities` flanks: animal i gives 2i, 2i+1."""
    return [(f"A{n // 2:03d}_{FLANKS[n % 2]}", n // 2, FLANKS[n % 2]) for n in range(identities)]


def identity_photos(
    identity_index: int, images_per_identity: int, seed: int, height: int = 480, width: int = 640
) -> Iterator[tuple[str, str, str, np.ndarray]]:
    """(identity, flank, file stem, BGR photo) for the photos of one identity."""
    identity, animal, flank = identity_names(identity_index + 1)[identity_index]
    coat = scene.draw_coat(
        np.random.default_rng([seed, animal, FLANKS.index(flank)]), scene.coat_style(seed, animal)
    )
    shape = scene.animal_shape(seed, animal)
    for n in range(images_per_identity):
        rng = np.random.default_rng([seed, animal, FLANKS.index(flank), n + 1])
        yield (
            identity,
            flank,
            f"{identity}_{n:03d}",
            scene.render_photo(coat, shape, flank, rng, height, width),
        )


def photos(
    identities: int, images_per_identity: int, seed: int, height: int = 480, width: int = 640
) -> Iterator[tuple[str, str, str, np.ndarray]]:
    """(identity, flank, file stem, BGR photo) for every photo, in a fixed order."""
    for k in range(identities):
        yield from identity_photos(k, images_per_identity, seed, height, width)


def _write_identity(
    out: pathlib.Path,
    identity_index: int,
    images_per_identity: int,
    seed: int,
    height: int,
    width: int,
) -> int:
    cv2.setNumThreads(1)  # parallelism comes from the process pool
    count = 0
    for identity, _, stem, image in identity_photos(
        identity_index, images_per_identity, seed, height, width
    ):
        folder = out / identity
        folder.mkdir(parents=True, exist_ok=True)
        ok, data = cv2.imencode(".jpg", image, [cv2.IMWRITE_JPEG_QUALITY, 90])
        if not ok:
            raise RuntimeError(f"JPEG encoding failed for {folder / stem}.jpg")
        tmp = folder / f".{stem}.jpg.tmp"  # renamed when complete: no half-written photo
        tmp.write_bytes(data.tobytes())
        os.replace(tmp, folder / f"{stem}.jpg")
        count += 1
    return count


def write_photos(
    out: str | os.PathLike,
    identities: int,
    images_per_identity: int,
    seed: int,
    height: int = 480,
    width: int = 640,
    workers: int = 0,
) -> int:
    """Identity folders of JPEGs (`OUT/<identity>/<identity>_<n>.jpg`); returns the count.

    `workers` > 0 renders identities in that many processes; the files are the same.
    """
    out = pathlib.Path(out)
    jobs = [(out, k, images_per_identity, seed, height, width) for k in range(identities)]
    if workers <= 0:
        return sum(_write_identity(*job) for job in jobs)
    import concurrent.futures
    import multiprocessing

    context = multiprocessing.get_context("spawn")
    with concurrent.futures.ProcessPoolExecutor(workers, mp_context=context) as pool:
        return sum(pool.map(_write_identity, *zip(*jobs)))


def simple_edges(bgr: np.ndarray) -> np.ndarray:
    """A stand-in edge channel (grey → blur → Canny), for datasets written without
    preprocess."""
    grey = cv2.GaussianBlur(cv2.cvtColor(bgr, cv2.COLOR_BGR2GRAY), (5, 5), 0)
    return cv2.Canny(grey, 55, 160)


def write_records_dataset(
    dataset_dir: str | os.PathLike,
    identities: int,
    images_per_identity: int,
    seed: int,
    height: int = 64,
    width: int = 128,
    photo_height: int = 240,
    photo_width: int = 320,
) -> int:
    """A complete dataset directory (records.py format) straight from synthetic photos.

    The whole photo is the crop (like `--detector none`); the edge channel is `simple_edges`,
    not preprocess's. Returns the number of records.
    """
    from leopard_jax.data import records

    dataset_dir = pathlib.Path(dataset_dir)
    for sub in ("crops", "edges"):
        (dataset_dir / sub).mkdir(parents=True, exist_ok=True)
    records.save_settings(
        dataset_dir,
        {
            "height": height,
            "width": width,
            "channels": 4,
            "source": "leopard_jax.data.synthetic",
            "seed": seed,
            "edges": "simple",
        },
    )

    def items():
        for identity, flank, stem, photo in photos(
            identities, images_per_identity, seed, photo_height, photo_width
        ):
            crop = cv2.resize(photo, (width, height), interpolation=cv2.INTER_AREA)
            edge = simple_edges(crop)
            key = f"{identity}/{stem}#0"
            crop_rel, edge_rel = f"crops/{identity}__{stem}.jpg", f"edges/{identity}__{stem}.jpg"
            cv2.imwrite(str(dataset_dir / crop_rel), crop)
            cv2.imwrite(str(dataset_dir / edge_rel), edge)
            row = {
                "key": key,
                "source": f"{identity}/{stem}.jpg",
                "identity": identity,
                "flank": flank,
                "crop": crop_rel,
                "edge": edge_rel,
            }
            yield row, np.dstack([crop[..., ::-1], edge])

    return records.write_records(dataset_dir, "synthetic-00000", items())


FLAGS = flags.FlagValues()
_OUT = flags.DEFINE_string(
    "out", None, "folder to write <identity>/<photo>.jpg into", flag_values=FLAGS, required=True
)
_IDENTITIES = flags.DEFINE_integer(
    "identities", 40, "identity folders (two flanks per animal)", flag_values=FLAGS
)
_PER_IDENTITY = flags.DEFINE_integer(
    "images-per-identity", 8, "photos per identity", flag_values=FLAGS
)
_SEED = flags.DEFINE_integer("seed", 0, "seed of everything drawn", flag_values=FLAGS)
_HEIGHT = flags.DEFINE_integer("height", 480, "photo height in pixels", flag_values=FLAGS)
_WIDTH = flags.DEFINE_integer("width", 640, "photo width in pixels", flag_values=FLAGS)
_WORKERS = flags.DEFINE_integer(
    "workers",
    min(4, os.cpu_count() or 1),
    "processes rendering identities in parallel (0 = in this process)",
    flag_values=FLAGS,
)


def run(argv: list[str]) -> None:
    if argv:
        raise cli.CommandError(f"unexpected arguments {argv}; see --help")
    if min(_IDENTITIES.value, _PER_IDENTITY.value) < 1 or min(_HEIGHT.value, _WIDTH.value) < 32:
        raise cli.CommandError(
            "--identities and --images-per-identity must be >= 1, --height/--width >= 32"
        )
    out = pathlib.Path(_OUT.value)
    if out.exists() and not out.is_dir():
        raise cli.CommandError(f"--out {out} is a file; give a folder")
    n = write_photos(
        out,
        _IDENTITIES.value,
        _PER_IDENTITY.value,
        _SEED.value,
        _HEIGHT.value,
        _WIDTH.value,
        _WORKERS.value,
    )
    print(f"wrote {n} photos of {_IDENTITIES.value} identities to {out}")


def main(argv: list[str] | None = None) -> int:
    return cli.run(FLAGS, run, argv, prog="python -m leopard_jax.data.synthetic")


if __name__ == "__main__":
    sys.exit(main())
