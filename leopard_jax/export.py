"""An exported model as one ONNX file, for ONNX Runtime and the tools that load ONNX.

    python -m leopard_jax.export --checkpoint WORKDIR_OR_MODEL_DIR --out model.onnx

The graph is the whole embedding model with the normalisation inside: input `images`
uint8 [B, H, W, C] (NHWC, channels R, G, B, edge, as the dataset's records), output
`embeddings` float32 unit-norm [B, dims], B dynamic. So a caller feeds the records' pixels
as they are, the same contract as `inference.embed_images`, and cannot normalise wrongly.
The file's metadata (`leopard_jax.*` keys) repeats the input contract, the model.json
description and the weights' fingerprint, so `embed --update` knows which model made a file.

Why jax2onnx: it traces the same Linen `apply` that training and `embed` run, so the file
computes the same function; no second model definition. Every convolution is traced as a
convolution (`onnx_formulation`): depthwise ones in their grouped formulation
(`layers.depthwise_conv_grouped`), one `Conv` with `group = C`, where the CPU default
(shifted slices, chosen for XLA's gradients) would become k·k slices and multiplies; 1x1
ones as `Conv`, where training's matmul became Einsum between Transposes. So the graph is
Conv, batch norm and SiLU in one layout, which ONNX Runtime fuses (B2, batch 8, 256x512,
2 cores: 1.9x -> 2.6x the PyTorch reference in one run under load).

This module owns the file: `export_onnx` / `write` (export) and `load` (embed).
"""

from __future__ import annotations

import contextlib
import functools
import json
import os
import pathlib
import sys
import unittest.mock
from typing import Any

from absl import flags

from leopard_jax import cli, model_io

INPUT, OUTPUT = "images", "embeddings"
META_PREFIX = "leopard_jax."
CHANNELS = "R,G,B,edge"

FLAGS = flags.FlagValues()
_CHECKPOINT = flags.DEFINE_string(
    "checkpoint",
    None,
    "training workdir (its best_model/) or model dir (e.g. from leopard_jax.models.convert)",
    flag_values=FLAGS,
    required=True,
)
_OUT = flags.DEFINE_string("out", None, "output .onnx file", flag_values=FLAGS, required=True)


class ExportError(ValueError):
    """A model or ONNX file that does not fit; the message names the file and the fix."""


@contextlib.contextmanager
def onnx_formulation():
    """Trace every convolution as a convolution whatever the backend: depthwise ones as
    XLA's grouped convolution (one grouped ONNX `Conv` each) and 1x1 ones as a `Conv`, not
    the matmul that training uses. jax2onnx then keeps the whole trunk in NCHW (Conv, batch
    norm, SiLU, no transposes between), and ONNX Runtime fuses Conv + batch norm (+ SiLU);
    with 1x1 matmuls every block became Einsum + two Transposes, 40% of the run time."""
    from leopard_jax.models import layers

    with (
        unittest.mock.patch.object(layers, "depthwise_default_impl", lambda: "grouped"),
        unittest.mock.patch.object(layers, "pointwise_impl", lambda: "conv"),
    ):
        yield


def max_pool(x, window_shape, strides=None, padding="VALID"):
    """flax's `max_pool` for [B, H, W, C] as the maximum of strided slices of the padded
    input: jax2onnx exports `lax.reduce_window` as a MaxPool over all four axes, which ONNX
    Runtime cannot run. (ResNet's stem is the one max pool.)"""
    import jax
    import jax.numpy as jnp

    (kh, kw), (sh, sw) = window_shape, strides or (1, 1)
    if isinstance(padding, str):
        spatial = x.shape[1:3]
        padding = jax.lax.padtype_to_pads(spatial, (kh, kw), (sh, sw), padding)
    (top, bottom), (left, right) = padding
    xp = jnp.pad(x, ((0, 0), (top, bottom), (left, right), (0, 0)), constant_values=-jnp.inf)
    out_h, out_w = (xp.shape[1] - kh) // sh + 1, (xp.shape[2] - kw) // sw + 1
    taps = [
        xp[:, i : i + (out_h - 1) * sh + 1 : sh, j : j + (out_w - 1) * sw + 1 : sw, :]
        for i in range(kh)
        for j in range(kw)
    ]
    return functools.reduce(jnp.maximum, taps)


@contextlib.contextmanager
def traceable_max_pool():
    """Our `max_pool` for flax's while jax2onnx traces: jax2onnx 0.17 swaps in its own,
    which takes neither a positional window nor explicit padding (ResNet's stem passes
    both). Entered inside the traced function, after jax2onnx's own replacement."""
    import flax.linen
    import flax.linen.pooling

    with (
        unittest.mock.patch.object(flax.linen, "max_pool", max_pool),
        unittest.mock.patch.object(flax.linen.pooling, "max_pool", max_pool),
    ):
        yield


def export_onnx(
    model, variables: Any, *, height: int, width: int, channels: int, metadata: dict[str, str]
):
    """onnx.ModelProto of uint8 [B, height, width, channels] -> `model`'s embeddings, with
    `variables` as constants and `metadata` as the file's metadata properties."""
    import jax
    import jax.numpy as jnp
    import numpy as np

    try:
        from jax2onnx import to_onnx
    except ImportError as e:
        raise ExportError(
            f"ONNX export needs jax2onnx ({e}); install it with `make export-deps` "
            "(see README: it is installed without its orbax pin)"
        ) from e

    from leopard_jax import inference

    variables = jax.tree.map(np.asarray, dict(variables))

    def forward(images):
        # Normalised in NCHW, then back: the first Conv's NCHW transpose cancels the second,
        # and ONNX Runtime's per-channel Mul and Add run over whole planes (NHWC's
        # broadcast over a last axis of 4 took ~3x as long: B2 batch 8, 300 -> 290 ms).
        nchw = inference.normalize(images.transpose(0, 3, 1, 2), channel_axis=1)
        with traceable_max_pool():
            return model.apply(variables, nchw.transpose(0, 2, 3, 1), train=False)

    with onnx_formulation():
        proto = to_onnx(
            forward,
            [jax.ShapeDtypeStruct(("B", height, width, channels), jnp.uint8)],
            model_name="leopard_jax_embedding",
            input_names=[INPUT],
            output_names=[OUTPUT],
        )
    # jax2onnx leaves NHWC shapes on tensors its layout pass made NCHW; they are optional
    # hints, and stale ones only make ONNX Runtime warn, so drop them.
    del proto.graph.value_info[:]
    for key, value in metadata.items():
        entry = proto.metadata_props.add()
        entry.key, entry.value = key, value
    return proto


def metadata(description: dict[str, Any], weights_sha1: str, dtype: str = "float32") -> dict:
    """The file's metadata: the input contract, model.json and the weights' fingerprint."""
    from leopard_jax.data import augment

    want = description["input"]
    channels = int(
        want.get("channels") or description["model"].get("in_chans") or len(augment.MEAN)
    )
    return {
        META_PREFIX + "input": json.dumps(
            {
                "name": INPUT,
                "layout": "NHWC",
                "dtype": "uint8",
                "height": int(want["height"]),
                "width": int(want["width"]),
                "channels": channels,
                "channel_order": CHANNELS,
                "normalization": "inside the graph: (x / 255 - mean) / std",
                "mean": augment.MEAN.tolist(),
                "std": augment.STD.tolist(),
            }
        ),
        META_PREFIX + "output": json.dumps({"name": OUTPUT, "dtype": "float32", "norm": 1.0}),
        META_PREFIX + "model": json.dumps(description, sort_keys=True, default=str),
        META_PREFIX + "model_fingerprint": weights_sha1,
        META_PREFIX + "dtype": dtype,
    }


def resolve(checkpoint) -> pathlib.Path:
    """The model dir of `checkpoint`; a workdir that has no best model yet says so."""
    path = pathlib.Path(checkpoint)
    try:
        return model_io.resolve_model_dir(path).absolute()
    except model_io.ModelDirError:
        if (path / "checkpoints").is_dir():
            raise ExportError(
                f"{path}: a training workdir without {model_io.WORKDIR_BEST}/ (no held-out "
                "evaluation has finished yet); export after the first evaluation, or pass a "
                "model dir"
            ) from None
        raise


def export_model(description: dict[str, Any], variables: Any, weights_sha1: str):
    """onnx.ModelProto of the model `description` (model.json) with `variables`."""
    meta = metadata(description, weights_sha1)
    contract = json.loads(meta[META_PREFIX + "input"])
    return export_onnx(
        model_io.build_model(description),
        variables,
        height=contract["height"],
        width=contract["width"],
        channels=contract["channels"],
        metadata=meta,
    )


def export_model_dir(checkpoint):
    """(onnx.ModelProto, description) of an exported model dir or a workdir's best model."""
    from leopard_jax import embed

    description, variables = model_io.load_model(resolve(checkpoint))
    return export_model(description, variables, embed.fingerprint(variables)), description


def check_out(out: str | os.PathLike) -> pathlib.Path:
    out = pathlib.Path(out)
    if out.is_dir():
        raise ExportError(f"--out {out}: is a directory; pass a file name such as model.onnx")
    if not out.parent.is_dir():
        raise ExportError(f"--out {out}: folder {out.parent} does not exist; create it first")
    return out


def write(proto, out: str | os.PathLike) -> pathlib.Path:
    """Write `proto` to `out` (aside, then renamed, so a crash leaves no half file)."""
    out = check_out(out)
    tmp = out.with_name(out.name + ".tmp")
    tmp.write_bytes(proto.SerializeToString())
    os.replace(tmp, out)
    return out


def read_metadata(session_or_proto) -> dict[str, str]:
    """The `leopard_jax.*` metadata of an ONNX Runtime session or ModelProto (prefix kept)."""
    if hasattr(session_or_proto, "get_modelmeta"):
        props = session_or_proto.get_modelmeta().custom_metadata_map
    else:
        props = {p.key: p.value for p in session_or_proto.metadata_props}
    return {k: v for k, v in props.items() if k.startswith(META_PREFIX)}


def load(source, *, threads: int = 0):
    """(onnxruntime.InferenceSession on the CPU, metadata) of an .onnx file or ModelProto
    written by this module; `threads` 0 lets ONNX Runtime choose."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    # All graph optimisations (Python's default, stated): Conv + batch norm folding, SiLU
    # fusion, the NCHWc blocked layout. One operator at a time, each on `threads`.
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    options.intra_op_num_threads = threads
    options.log_severity_level = 3  # errors only
    if isinstance(source, str | os.PathLike):
        path = pathlib.Path(source)
        if not path.is_file():
            raise ExportError(
                f"{path}: no such ONNX file; write one with `python -m leopard_jax.export`"
            )
        data = path.read_bytes()
    else:
        path, data = "<in memory>", source.SerializeToString()
    try:
        session = ort.InferenceSession(data, options, providers=["CPUExecutionProvider"])
    except Exception as e:  # onnxruntime raises its own Fail/InvalidGraph/... types
        raise ExportError(f"{path}: not a readable ONNX model ({str(e).splitlines()[0]})") from e
    meta = read_metadata(session)
    if META_PREFIX + "input" not in meta:
        raise ExportError(
            f"{path}: has no leopard_jax metadata (input size, channels, fingerprint); "
            "export the model with `python -m leopard_jax.export`"
        )
    return session, meta


def input_contract(meta: dict[str, str]) -> dict[str, Any]:
    return json.loads(meta[META_PREFIX + "input"])


def description_of(meta: dict[str, str]) -> dict[str, Any]:
    return json.loads(meta[META_PREFIX + "model"])


# --------------------------------------------------------------------------- the command


def run(checkpoint, out, *, log=print) -> pathlib.Path:
    check_out(out)  # before the slow part
    proto, description = export_model_dir(checkpoint)
    path = write(proto, out)
    model = description["model"]
    log(
        f"exported {model.get('backbone')} ({model.get('dims')} dims, input uint8 NHWC "
        f"{description['input']['height']}x{description['input']['width']}) -> {path} "
        f"[{path.stat().st_size / 2**20:.1f} MiB]"
    )
    return path


def command(argv: list[str]) -> None:
    if argv:
        raise cli.CommandError(f"unexpected arguments {argv}; every setting is a flag, see --help")
    run(_CHECKPOINT.value, _OUT.value)


def main(argv: list[str] | None = None) -> int:
    return cli.run(
        FLAGS,
        command,
        argv,
        errors=(ExportError, model_io.ModelDirError),
        prog="python -m leopard_jax.export",
    )


if __name__ == "__main__":
    sys.exit(main())
