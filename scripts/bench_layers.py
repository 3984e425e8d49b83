"""EfficientNetV2-B2's 3×3 and depthwise convolutions one by one against PyTorch's, the
`layers` part of scripts/bench.py:

    python scripts/bench.py layers --batch 8

Each layer runs forward and backward (both gradients; the stem's kernel gradient only, as in
training) at the shape it has in the bench's training step, ours (`layers.conv_xla`,
`layers.depthwise_conv_shifted`, with the package's XLA flags) alternating with
`torch.nn.Conv2d` (channels_last, padding 1: the same output size and work as TF-same).
Figures: ms per training step of each kind, summed over B2's layers of that kind, and the
ratio reference_ms / ours_ms (above 1: ours faster). Why: the training step's gap to
PyTorch on a CPU sits in these kernels (WORKSPACE.md, issue 20), and this measures it
without the rest of the step around it.
"""

from __future__ import annotations

import dataclasses

import bench
import numpy as np


@dataclasses.dataclass(frozen=True)
class Layer:
    """`count` layers of one kind at input size (height // scale, width // scale)."""

    kind: str  # "conv3x3" or "depthwise"
    count: int
    scale: int
    cin: int
    cout: int
    stride: int
    input_grad: bool = True


# tf_efficientnetv2_b2: the stem, the fused stages' 3×3 convolutions, the MBConv stages'
# depthwise ones (tests/test_bench.py checks the kernels against the model's parameters).
B2_LAYERS = (
    Layer("conv3x3", 1, 1, 4, 32, 2, input_grad=False),
    Layer("conv3x3", 1, 2, 32, 16, 1),
    Layer("conv3x3", 1, 2, 16, 16, 1),
    Layer("conv3x3", 1, 2, 16, 64, 2),
    Layer("conv3x3", 2, 4, 32, 128, 1),
    Layer("conv3x3", 1, 4, 32, 128, 2),
    Layer("conv3x3", 2, 8, 56, 224, 1),
    Layer("depthwise", 1, 8, 224, 224, 2),
    Layer("depthwise", 3, 16, 416, 416, 1),
    Layer("depthwise", 1, 16, 624, 624, 1),
    Layer("depthwise", 5, 16, 720, 720, 1),
    Layer("depthwise", 1, 16, 720, 720, 2),
    Layer("depthwise", 9, 32, 1248, 1248, 1),
)


def kernel_shape(layer: Layer) -> tuple[int, int, int, int]:
    """The layer's kernel as the Flax model stores it (HWIO; depthwise [3, 3, 1, C])."""
    return (3, 3, 1, layer.cout) if layer.kind == "depthwise" else (3, 3, layer.cin, layer.cout)


def jax_layer(layer: Layer, x: np.ndarray, kernel: np.ndarray, dy: np.ndarray):
    """Ours, jitted: the forward and the gradients the training step computes."""
    import jax

    from leopard_jax.models import layers

    pad = layers.resolve_padding("tf_same", x.shape[1:3], 3, layer.stride)  # as the model pads
    conv = layers.depthwise_conv_shifted if layer.kind == "depthwise" else layers.conv_xla
    argnums = (0, 1) if layer.input_grad else (1,)

    @jax.jit
    def step(x, kernel, dy):
        y, vjp = jax.vjp(lambda *a: conv(*a, layer.stride, pad), x, kernel)
        grads = vjp(dy)
        return y, [grads[i] for i in argnums]  # y too: unused, jit would skip the forward

    args = [jax.device_put(a) for a in (x, kernel, dy)]
    return lambda: jax.block_until_ready(step(*args))[1]


def disagreement(layer: Layer, ours: list, reference: list) -> float:
    """Largest gradient difference between the sides, relative to the gradient's scale.
    Only stride 1 is compared: at stride 2 TF-same pads (0, 1) and PyTorch's padding 1
    pads (1, 1), the same work on a window shifted by one pixel."""
    if layer.stride != 1:
        return 0.0
    return max(
        float(np.abs(np.asarray(a) - b.detach().numpy()).max() / np.abs(np.asarray(a)).max())
        for a, b in zip(ours, reference, strict=True)
    )


def torch_layer(layer: Layer, x: np.ndarray, kernel: np.ndarray, dy: np.ndarray):
    """PyTorch's, eager, channels_last, with the same kernel: forward and the same
    gradients (NHWC / HWIO, in the order `jax_layer` gives them)."""
    import torch

    groups = layer.cin if layer.kind == "depthwise" else 1
    conv = torch.nn.Conv2d(layer.cin, layer.cout, 3, layer.stride, 1, groups=groups, bias=False)
    with torch.no_grad():  # HWIO (depthwise [3, 3, 1, C]) -> OIHW ([C, 1, 3, 3])
        conv.weight.copy_(torch.from_numpy(kernel).permute(3, 2, 0, 1))
    conv = conv.to(memory_format=torch.channels_last)
    tx = torch.from_numpy(x).permute(0, 3, 1, 2).contiguous(memory_format=torch.channels_last)
    tx.requires_grad_(layer.input_grad)
    tdy = torch.from_numpy(dy).permute(0, 3, 1, 2).contiguous(memory_format=torch.channels_last)
    wrt = (tx, conv.weight) if layer.input_grad else (conv.weight,)

    def step():
        *dx, dk = torch.autograd.grad(conv(tx), wrt, tdy)
        return [*(g.permute(0, 2, 3, 1) for g in dx), dk.permute(2, 3, 1, 0)]

    return step


def bench_layers(
    batch: int,
    height: int,
    width: int,
    rounds: int = 3,
    calls: int = 5,
    seed: int = 0,
    tolerance: float = 1e-4,
) -> tuple[dict, list[dict]]:
    """(figures per kind, one row per layer shape): ms per training step, each side's
    median per call over `rounds` rounds of `calls` calls, alternating as every bench part
    does (`bench.time_alternating`), after a first call that compiles and warms up. Raises
    ValueError if a stride-1 layer's gradients differ between the sides."""
    rng = np.random.default_rng(seed)
    rows = []
    for layer in B2_LAYERS:
        h, w = height // layer.scale, width // layer.scale
        x = rng.standard_normal((batch, h, w, layer.cin), np.float32)
        kernel = rng.standard_normal(kernel_shape(layer), np.float32) * np.float32(0.1)
        dy = rng.standard_normal(
            (batch, h // layer.stride, w // layer.stride, layer.cout), np.float32
        )
        sides = [
            bench.Side("leopard_jax", jax_layer(layer, x, kernel, dy), batch),
            bench.Side("reference", torch_layer(layer, x, kernel, dy), batch),
        ]
        first = [side.step() for side in sides]  # compiles, warms up
        if (gap := disagreement(layer, *first)) > tolerance:
            raise ValueError(f"{layer}: the two sides' gradients differ by {gap:.1e}")
        timing = bench.time_alternating(sides, steps=rounds * calls, rounds=rounds, warmup=0)
        ours, ref = (timing[side.label]["step_s_median"] * 1000 for side in sides)
        rows.append(
            {
                **dataclasses.asdict(layer),
                "input_hw": [h, w],
                "leopard_jax_ms": round(ours, 2),
                "reference_ms": round(ref, 2),
            }
        )
    figures = {}
    for kind in ("conv3x3", "depthwise"):
        ours = sum(r["leopard_jax_ms"] * r["count"] for r in rows if r["kind"] == kind)
        ref = sum(r["reference_ms"] * r["count"] for r in rows if r["kind"] == kind)
        figures[f"{kind}_ms"] = ours = round(ours, 1)
        figures[f"{kind}_reference_ms"] = ref = round(ref, 1)
        figures[f"{kind}_ratio"] = round(ref / ours, 3)  # of the figures as printed
    return figures, rows
