"""Import timm / spotID PyTorch weights into this package's Flax models.

Weights map by name: our submodules are named after timm's state-dict keys with
`.<index>` written `_<index>`, so every Flax leaf has exactly one timm key. Every leaf must
be found with the right shape and every checkpoint tensor must be used (batch-norm
counters and, for a backbone without classifier, the classifier excepted), so a wrong
`--backbone` fails loudly instead of loading half a model.

The stem is widened from the checkpoint's 3 input channels to `in_chans`: the RGB filters
are kept and every extra channel starts as a copy of the first (red) channel's filters,
as spotID does for its edge channel.

A spotID checkpoint with other than 3 input channels imports with an unpadded stem
(`stem_padding=0`, stored in model.json): spotID's code swaps timm's `Conv2dSame` stem for a
plain `nn.Conv2d` that copies the old stem's `padding` attribute, which is (0, 0) because
`Conv2dSame` pads inside `forward` (64x128 -> 31x63, not 32x64). A state dict does not
record padding, so this follows spotID's code; a 3-channel spotID model keeps timm's stem.

    python -m leopard_jax.models.convert --timm tf_efficientnetv2_b2.safetensors \\
        --backbone efficientnetv2_b2 --in-chans 4 --out models/b2_imagenet
    python -m leopard_jax.models.convert --spotid spotid.pth --backbone efficientnetv2_b2 \\
        --out models/spotid

`--timm` imports a backbone only: the embedding projection is freshly initialised
(`--seed`), so the result is a starting point for training, not a usable embedder.
"""

from __future__ import annotations

import functools
import pathlib
import re
import sys
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from absl import flags
from flax import linen as nn
from flax import traverse_util

from leopard_jax import cli, model_io
from leopard_jax.models import BACKBONES, build_backbone, canonical_name
from leopard_jax.models.embedding import HEADS

# Nested wrappers seen around a state dict in training checkpoints.
WRAPPER_KEYS = ("model_state_dict", "state_dict", "model")
IGNORED_SUFFIXES = ("num_batches_tracked",)
SPOTID_EMBEDDING = "embedding_layer"


class ConvertError(ValueError):
    """A checkpoint that does not fit the requested model; the message says why and what to do."""


# --------------------------------------------------------------------------- reading


def read_state_dict(path: str | pathlib.Path) -> dict[str, np.ndarray]:
    """{key: float32 array} from `.safetensors` (no torch needed) or a torch pickle
    (`.pth`/`.pt`/`.bin`, loaded with weights_only=True), unwrapping `{"state_dict": ...}`
    style containers and a DataParallel `module.` prefix."""
    path = pathlib.Path(path)
    if not path.is_file():
        raise ConvertError(
            f"{path}: no such file; pass the path of a .pth or .safetensors checkpoint"
        )
    try:
        if path.suffix == ".safetensors":
            from safetensors.numpy import load_file

            state: Any = load_file(str(path))
        else:
            state = _torch_load(path)
    except ConvertError:
        raise
    except Exception as e:  # corrupt or foreign file: name it, say what was expected
        kind = "safetensors" if path.suffix == ".safetensors" else "torch"
        raise ConvertError(
            f"{path}: cannot read as a {kind} "
            f"checkpoint ({type(e).__name__}: {e}); is it a complete state dict file?"
        ) from e
    return normalize_state_dict(state, str(path))


def normalize_state_dict(state: Any, where: str = "checkpoint") -> dict[str, np.ndarray]:
    """A loaded checkpoint object -> {key: float32 array}: unwraps `{"model_state_dict": ...}`
    style containers, drops a DataParallel `module.` prefix and batch-norm counters."""
    while isinstance(state, Mapping) and not _is_tensor_dict(state):
        inner = next(
            (state[k] for k in WRAPPER_KEYS if k in state and isinstance(state[k], Mapping)), None
        )
        if inner is None:
            raise ConvertError(
                f"{where}: holds a dict with keys {sorted(state)[:8]} but no state dict "
                f"(looked for {WRAPPER_KEYS}); save model.state_dict() instead"
            )
        state = inner
    if not isinstance(state, Mapping):
        raise ConvertError(
            f"{where}: holds a {type(state).__name__}, not a state dict; save model.state_dict()"
        )
    return {
        re.sub(r"^module\.", "", k): _to_numpy(v)
        for k, v in state.items()
        if not k.endswith(IGNORED_SUFFIXES)
    }


def _torch_load(path: pathlib.Path):
    try:
        import torch
    except ImportError as e:
        raise ConvertError(
            f"{path}: reading .pth needs torch (pip install torch), or convert the file to "
            ".safetensors elsewhere"
        ) from e
    return torch.load(path, map_location="cpu", weights_only=True)


def _is_tensor_dict(d: Mapping) -> bool:
    return bool(d) and all(hasattr(v, "shape") for v in d.values())


def _to_numpy(value) -> np.ndarray:
    if hasattr(value, "detach"):  # torch tensor, possibly half precision
        value = value.detach().float().numpy()
    return np.asarray(value, dtype=np.float32)


# --------------------------------------------------------------------------- mapping


def timm_key(path: tuple[str, ...]) -> str:
    """Flax variable path -> timm key: ("params", "blocks_3_0", "conv_dw", "kernel") ->
    "blocks.3.0.conv_dw.weight"; batch_stats mean/var -> running_mean/running_var."""
    collection, *modules, leaf = path
    names = [re.sub(r"_(?=\d)", ".", m) for m in modules]
    if collection == "batch_stats":
        leaf = {"mean": "running_mean", "var": "running_var"}[leaf]
    else:
        leaf = {"kernel": "weight", "scale": "weight", "bias": "bias"}[leaf]
    return ".".join(names + [leaf])


def to_flax_layout(array: np.ndarray) -> np.ndarray:
    """torch conv OIHW -> HWIO, linear [out, in] -> [in, out]; vectors unchanged."""
    if array.ndim == 4:
        return array.transpose(2, 3, 1, 0)
    if array.ndim == 2:
        return array.T
    return array


def widen_stem(weight: np.ndarray, in_chans: int) -> np.ndarray:
    """torch OIHW stem with 3 input channels -> `in_chans`: RGB kept, each extra channel a
    copy of the first channel's filters."""
    have = weight.shape[1]
    if in_chans < have:
        raise ConvertError(
            f"cannot narrow the stem from {have} to {in_chans} input channels; "
            f"use --in-chans >= {have}"
        )
    extra = np.repeat(weight[:, :1], in_chans - have, axis=1)
    return np.concatenate([weight, extra], axis=1)


@functools.lru_cache(maxsize=16)
def _backbone_template(backbone: str, num_classes: int, in_chans: int) -> dict:
    """Shapes only (eval_shape), cached: tracing a network costs about a second."""
    model = build_backbone(backbone, num_classes=num_classes)
    return jax.eval_shape(
        lambda: model.init(jax.random.PRNGKey(0), jnp.zeros((1, 32, 32, in_chans)), train=False)
    )


def find_prefix(state: Mapping[str, np.ndarray], template: dict, where: str) -> str:
    """The prefix (`""`, `"backbone."`, `"model."`, ...) under which the backbone's keys sit:
    the shortest one that completes the stem's key."""
    stem = next(
        timm_key(p)
        for p, leaf in traverse_util.flatten_dict(template).items()
        if len(leaf.shape) == 4
    )
    prefixes = [
        k[: -len(stem)]
        for k in state
        if k.endswith(stem) and (k == stem or k[-len(stem) - 1] == ".")
    ]
    if not prefixes:
        raise ConvertError(
            f"{where}: no key ending in {stem!r}; is this a checkpoint of the backbone you named?"
        )
    return min(prefixes, key=len)


def convert_backbone(
    state: Mapping[str, np.ndarray],
    backbone: str,
    in_chans: int,
    *,
    num_classes: int = 0,
    where: str = "checkpoint",
    prefix: str | None = None,
) -> tuple[dict, set[str]]:
    """timm state dict -> ({"params", "batch_stats"} for `build_backbone(backbone,
    num_classes=num_classes)`, the set of state keys used). The stem is widened to
    `in_chans`; with num_classes=0 the checkpoint's classifier is ignored."""
    template = _backbone_template(backbone, num_classes, in_chans)
    if prefix is None:
        prefix = find_prefix(state, template, where)
    used, flat = set(), {}
    for path, leaf in traverse_util.flatten_dict(template).items():
        key = prefix + timm_key(path)
        if key not in state:
            raise ConvertError(
                f"{where}: missing {key!r} for backbone {backbone}; check --backbone"
            )
        value = state[key]
        if value.ndim == 4 and value.shape[1] != leaf.shape[2] and leaf.shape[2] == in_chans:
            value = widen_stem(value, in_chans)
        value = to_flax_layout(value)
        if value.shape != tuple(leaf.shape):
            raise ConvertError(
                f"{where}: {key!r} has shape {value.shape} after layout change, "
                f"{backbone} needs {tuple(leaf.shape)}; check --backbone"
            )
        flat[path] = value
        used.add(key)
    if num_classes == 0:  # the classifier belongs to the checkpoint, not to a feature backbone
        full = _backbone_template(backbone, 1000, in_chans)
        used |= {prefix + timm_key(p) for p in traverse_util.flatten_dict(full)} & set(state)
    return traverse_util.unflatten_dict(flat), used


def _check_all_used(state: Mapping, used: set[str], where: str, backbone: str) -> None:
    unused = sorted(set(state) - used)
    if unused:
        raise ConvertError(
            f"{where}: {len(unused)} tensors not used by {backbone}, e.g. {unused[:3]}; "
            "check --backbone (B0..B3 differ in depth and width)"
        )


def load_timm_backbone(
    path: str | pathlib.Path, backbone: str, in_chans: int = 4, *, num_classes: int = 0
) -> dict:
    """{"params", "batch_stats"} for `build_backbone(backbone, num_classes=num_classes)` from
    a timm checkpoint, stem widened to `in_chans`."""
    state = read_state_dict(path)
    variables, used = convert_backbone(
        state, backbone, in_chans, num_classes=num_classes, where=str(path)
    )
    _check_all_used(state, used, str(path), backbone)
    return variables


def convert_spotid(
    state: Mapping[str, np.ndarray], backbone: str, where: str = "checkpoint"
) -> tuple[dict, dict]:
    """spotID EmbeddingNetwork state dict -> (variables, EmbeddingModel kwargs) for
    `EmbeddingModel(head="spotid")`: timm backbone with its classifier, then
    `embedding_layer` Linear(1000 -> dims). The kwargs set `stem_padding` 0 when the stem
    has other than 3 input channels: spotID replaced that stem by an unpadded nn.Conv2d
    (the checkpoint cannot say so; see the module docstring)."""
    emb_keys = [k for k in state if k.endswith(f"{SPOTID_EMBEDDING}.weight")]
    if len(emb_keys) != 1:
        raise ConvertError(
            f"{where}: expected one '{SPOTID_EMBEDDING}.weight' (spotID EmbeddingNetwork), "
            f"found {len(emb_keys)}; for a plain timm backbone use --timm"
        )
    emb_prefix = emb_keys[0][: -len("weight")]
    emb_w, emb_b = state[emb_prefix + "weight"], state[emb_prefix + "bias"]
    stem = [v for k, v in state.items() if v.ndim == 4 and not k.startswith(emb_prefix)]
    in_chans = stem[0].shape[1] if stem else 3
    rest = {k: v for k, v in state.items() if not k.startswith(emb_prefix)}
    backbone_vars, used = convert_backbone(
        rest, backbone, in_chans, num_classes=emb_w.shape[1], where=where
    )
    _check_all_used(rest, used, where, backbone)
    variables = {
        "params": {
            "backbone": backbone_vars["params"],
            "embedding": {"kernel": emb_w.T, "bias": emb_b},
        },
        "batch_stats": {"backbone": backbone_vars["batch_stats"]},
    }
    kwargs = {"head": "spotid", "dims": int(emb_w.shape[0]), "in_chans": int(in_chans)}
    if _is_efficientnet(backbone):  # spotID's CustomEfficientNet is where the stem was swapped
        kwargs["stem_padding"] = "tf_same" if in_chans == 3 else 0
    return variables, kwargs


def _is_efficientnet(backbone: str) -> bool:
    return canonical_name(backbone).startswith("efficientnetv2")


def load_spotid(path: str | pathlib.Path, backbone: str) -> tuple[dict, dict]:
    """(variables, EmbeddingModel kwargs) from a spotID checkpoint file."""
    return convert_spotid(read_state_dict(path), backbone, where=str(path))


def with_fresh_head(backbone_vars: dict, backbone: str, head: str, dims: int, seed: int) -> dict:
    """EmbeddingModel variables: the imported backbone plus a seeded, freshly initialised
    projection (the only part a timm ImageNet checkpoint cannot supply). Initialised on
    its own: tracing the whole model for one Dense layer costs seconds."""
    width = HEADS[head] or build_backbone(backbone, num_classes=0).num_features  # 0: pooled
    projection = nn.Dense(dims, param_dtype=jnp.float32).init(
        jax.random.PRNGKey(seed), jnp.zeros((1, width))
    )
    return {
        "params": {
            "backbone": backbone_vars["params"],
            "embedding": jax.device_get(projection["params"]),
        },
        "batch_stats": {"backbone": backbone_vars["batch_stats"]},
    }


# --------------------------------------------------------------------------- command line


FLAGS = flags.FlagValues()
_TIMM = flags.DEFINE_string(
    "timm",
    None,
    "timm state dict (.pth or .safetensors); backbone only, the embedding "
    "projection is freshly initialised with --seed",
    flag_values=FLAGS,
)
_SPOTID = flags.DEFINE_string(
    "spotid", None, "spotID EmbeddingNetwork checkpoint (.pth or .safetensors)", flag_values=FLAGS
)
flags.mark_flags_as_mutual_exclusive(["timm", "spotid"], required=True, flag_values=FLAGS)
_BACKBONE = flags.DEFINE_string(
    "backbone",
    None,
    f"one of {', '.join(BACKBONES)} (timm's tf_efficientnetv2_b0..b3 names too)",
    flag_values=FLAGS,
    required=True,
)
_OUT = flags.DEFINE_string("out", None, "output model directory", flag_values=FLAGS, required=True)
_IN_CHANS = flags.DEFINE_integer(
    "in-chans", 4, "input channels for --timm (stem widened)", flag_values=FLAGS
)
_HEAD = flags.DEFINE_enum(
    "head", "pooled", list(HEADS), "embedding head for --timm", flag_values=FLAGS
)
_DIMS = flags.DEFINE_integer("dims", 1024, "embedding size for --timm", flag_values=FLAGS)
_SEED = flags.DEFINE_integer(
    "seed", 0, "seed of the fresh projection for --timm", flag_values=FLAGS
)
_HEIGHT = flags.DEFINE_integer(
    "height", 256, "input height recorded in model.json", flag_values=FLAGS
)
_WIDTH = flags.DEFINE_integer("width", 512, "input width recorded in model.json", flag_values=FLAGS)


def run(argv: list[str]) -> None:
    """Import the checkpoint named by --timm or --spotid and write it as a model directory."""
    del argv
    backbone = canonical_name(_BACKBONE.value)
    if _TIMM.value:
        head, dims, in_chans, seed = _HEAD.value, _DIMS.value, _IN_CHANS.value, _SEED.value
        backbone_vars = load_timm_backbone(_TIMM.value, backbone, in_chans, num_classes=HEADS[head])
        variables = with_fresh_head(backbone_vars, backbone, head, dims, seed)
        kwargs = {"head": head, "dims": dims, "in_chans": in_chans}
        info = {
            "source": "timm",
            "checkpoint": str(pathlib.Path(_TIMM.value).absolute()),
            "note": f"backbone imported; embedding projection freshly initialised (seed {seed})",
        }
    else:
        variables, kwargs = load_spotid(_SPOTID.value, backbone)
        info = {"source": "spotid", "checkpoint": str(pathlib.Path(_SPOTID.value).absolute())}
    description = {
        "model": {"backbone": backbone, **kwargs},
        "input": {"height": _HEIGHT.value, "width": _WIDTH.value},
        "info": info,
    }
    model_io.save_model(_OUT.value, variables, description)
    stem = f", stem padding {kwargs['stem_padding']}" if "stem_padding" in kwargs else ""
    channels = f"{kwargs['in_chans']} input channels"
    print(f"wrote {_OUT.value} ({backbone}, head {kwargs['head']}, {channels}{stem})")


def main(argv: list[str] | None = None) -> int:
    # ValueError: an unknown --backbone (canonical_name) exits 2 with its one line too
    return cli.run(
        FLAGS,
        run,
        argv,
        errors=(ConvertError, ValueError),
        prog="python -m leopard_jax.models.convert",
    )


if __name__ == "__main__":
    sys.exit(main())
