"""Flax backbones against timm itself: same random weights, same input, eval mode.

timm builds the reference with random weights (nothing downloaded); batch-norm scale, bias
and running statistics are randomised too, since timm's init leaves them at 1/0 (and
zero-inits ResNet's last BN), which would hide a wrong epsilon or a swapped mean/var.
4 input channels use the widening rule on both sides: a 4-channel timm model is loaded with
the 3-channel stem plus a copy of its first channel, written here independently of convert.
"""

from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")
timm = pytest.importorskip("timm")

import jax  # noqa: E402

from leopard_jax.models import build_backbone  # noqa: E402
from leopard_jax.models.convert import convert_backbone  # noqa: E402

TOL = 1e-4  # max |diff| <= TOL * max |reference|
SIZES = [(224, 224), (128, 256)]
CASES = [  # (ours, timm, [(in_chans, (H, W)), ...]); B2 skips two combinations to save compiles
    ("efficientnetv2_b0", "tf_efficientnetv2_b0", [(c, s) for c in (3, 4) for s in SIZES]),
    ("resnet18", "resnet18", [(c, s) for c in (3, 4) for s in SIZES]),
    ("efficientnetv2_b2", "tf_efficientnetv2_b2", [(3, SIZES[0]), (4, SIZES[1])]),
]
STEM = {
    "efficientnetv2_b0": "conv_stem.weight",
    "efficientnetv2_b2": "conv_stem.weight",
    "resnet18": "conv1.weight",
}


def randomize_batch_norm(model, in_chans: int = 3, seed: int = 1):
    """Random BN scale/bias, then running statistics measured on a random batch (one
    train-mode pass, momentum 1), then eval mode. timm's init leaves BN at 1/0/0/1, which
    would hide a swapped mean/var or a wrong epsilon; purely random statistics instead let
    activations grow ~1e4 through B2's 28 blocks, where float32 itself (torch vs float64)
    is off by 1e-2. Measured statistics keep every layer near unit scale, like a trained net."""
    g = torch.Generator().manual_seed(seed)
    norms = [m for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    with torch.no_grad():
        for mod in norms:
            mod.weight.copy_(torch.rand(mod.num_features, generator=g) + 0.5)
            mod.bias.copy_(torch.randn(mod.num_features, generator=g) * 0.1)
            mod.momentum = 1.0
        model.train()(torch.randn(2, in_chans, 224, 224, generator=g))
        for mod in norms:
            mod.momentum = 0.1
    return model.eval()


def timm_pair(timm_name: str, stem_key: str, seed: int = 0):
    """(3-channel model, 4-channel model with the widened stem, 3-channel numpy state dict)."""
    torch.manual_seed(seed)
    rgb = randomize_batch_norm(timm.create_model(timm_name, pretrained=False))
    state = rgb.state_dict()
    widened = dict(state)
    widened[stem_key] = torch.cat([state[stem_key], state[stem_key][:, :1]], dim=1)
    four = timm.create_model(timm_name, pretrained=False, in_chans=4)
    four.load_state_dict(widened)
    return rgb, four.eval(), {k: v.numpy() for k, v in state.items()}


@pytest.fixture(scope="module", params=CASES, ids=[c[0] for c in CASES])
def case(request):
    name, timm_name, combos = request.param
    rgb, four, state = timm_pair(timm_name, STEM[name])
    model = build_backbone(name)
    forward = jax.jit(lambda v, x: model.apply(v, x, train=False))
    return dict(name=name, timm={3: rgb, 4: four}, state=state, forward=forward, combos=combos)


def test_outputs_match_timm(case):
    rng = np.random.default_rng(0)
    for in_chans, (h, w) in case["combos"]:
        variables, _ = convert_backbone(case["state"], case["name"], in_chans, num_classes=1000)
        x = rng.standard_normal((2, in_chans, h, w), dtype=np.float32)
        with torch.no_grad():
            ref = case["timm"][in_chans](torch.from_numpy(x)).numpy()
        out = np.asarray(case["forward"](variables, x.transpose(0, 2, 3, 1)))
        assert out.shape == ref.shape
        err = np.abs(out - ref).max() / np.abs(ref).max()
        assert err <= TOL, f"{case['name']} {in_chans}ch {h}x{w}: relative max error {err:.2e}"


def test_parameter_counts_match_timm(case):
    for in_chans in (3, 4):
        variables, _ = convert_backbone(case["state"], case["name"], in_chans, num_classes=1000)
        ours = sum(np.size(p) for p in jax.tree.leaves(variables["params"]))
        theirs = sum(p.numel() for p in case["timm"][in_chans].parameters())
        assert ours == theirs


def test_widened_stem_copies_first_channel(case):
    variables, _ = convert_backbone(case["state"], case["name"], 5, num_classes=1000)
    stem = variables["params"]["conv_stem" if "efficientnet" in case["name"] else "conv1"]["kernel"]
    np.testing.assert_array_equal(stem[:, :, 3], stem[:, :, 0])
    np.testing.assert_array_equal(stem[:, :, 4], stem[:, :, 0])
    np.testing.assert_array_equal(
        stem[:, :, :3], case["state"][STEM[case["name"]]].transpose(2, 3, 1, 0)
    )


def test_random_init_scales_match_timm():
    """Per-layer weight std of a fresh model equals timm's own init (same architecture), so a
    run from random weights starts where timm's would. A depthwise kernel inited with flax's
    whole-layer fan-out was C times too small in variance and left eval-mode batch norm blind
    early in training; this compares every conv, depthwise included."""
    import flax

    ours = build_backbone("efficientnetv2_b0", num_classes=0)
    variables = ours.init(jax.random.PRNGKey(0), np.zeros((1, 64, 64, 3), np.float32), False)
    flat = flax.traverse_util.flatten_dict(variables["params"], sep="/")
    ref = timm.create_model("tf_efficientnetv2_b0", pretrained=False, num_classes=0)
    ref_stds = {name: float(p.detach().std()) for name, p in ref.named_parameters() if p.ndim == 4}
    ours_stds = {name: float(np.std(v)) for name, v in flat.items() if v.ndim == 4}
    assert len(ours_stds) == len(ref_stds)
    # Both enumerate the convolutions in network order; compare pairwise.
    for (name, ours_std), (ref_name, ref_std) in zip(ours_stds.items(), ref_stds.items()):
        assert ours_std == pytest.approx(ref_std, rel=0.25), (name, ref_name)
