"""Weight import: file formats, checkpoint wrappers/prefixes, the CLI, bad input, and a
spotID-shaped EmbeddingNetwork (timm backbone, stem swapped for spotID's unpadded 4-channel
nn.Conv2d, Linear 1000->1024, L2-normalise) against its own PyTorch forward."""

from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")
timm = pytest.importorskip("timm")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

from leopard_jax import model_io  # noqa: E402
from leopard_jax.models import convert  # noqa: E402
from leopard_jax.models.embedding import EmbeddingModel  # noqa: E402

BACKBONE = "efficientnetv2_b0"


class SpotIDNetwork(torch.nn.Module):
    """spotID's EmbeddingNetwork: timm classifier logits -> Linear -> normalise. With other
    than 3 channels the stem is replaced as spotID's CustomEfficientNet does: a plain Conv2d
    with padding 0 (what Conv2dSame stores; it pads in forward)."""

    def __init__(self, in_chans: int = 4):
        super().__init__()
        self.backbone = timm.create_model("tf_efficientnetv2_b0", pretrained=False)
        if in_chans != 3:
            old = self.backbone.conv_stem
            self.backbone.conv_stem = torch.nn.Conv2d(
                in_chans, old.out_channels, 3, 2, padding=0, bias=False
            )
        self.embedding_layer = torch.nn.Linear(1000, 1024)

    def forward(self, x):
        return torch.nn.functional.normalize(self.embedding_layer(self.backbone(x)), dim=1)


@pytest.fixture(scope="module")
def timm_state():
    torch.manual_seed(0)
    return timm.create_model("tf_efficientnetv2_b0", pretrained=False).state_dict()


@pytest.fixture(scope="module")
def spotid():
    torch.manual_seed(1)
    net = SpotIDNetwork()
    with torch.no_grad():  # non-trivial BN statistics so eval mode is really exercised
        for mod in net.modules():
            if isinstance(mod, torch.nn.BatchNorm2d):
                mod.running_mean.normal_(0, 0.1)
                mod.running_var.uniform_(0.5, 1.5)
                mod.weight.uniform_(0.5, 1.5)
    return net.eval()


def test_spotid_checkpoint_embeds_like_pytorch(spotid, tmp_path):
    path = tmp_path / "spotid.pth"
    torch.save({"model_state_dict": spotid.state_dict(), "epoch": 3}, path)
    assert (
        convert.main(
            [
                "--spotid",
                str(path),
                "--backbone",
                "tf_efficientnetv2_b0",
                "--out",
                str(tmp_path / "m"),
            ]
        )
        == 0
    )
    description, variables = model_io.load_model(tmp_path / "m")
    assert description["model"] == {
        "backbone": BACKBONE,
        "head": "spotid",
        "dims": 1024,
        "in_chans": 4,
        "stem_padding": 0,
    }
    model = EmbeddingModel(**description["model"])
    x = np.random.default_rng(0).standard_normal((2, 4, 64, 128), dtype=np.float32)
    assert spotid.backbone.conv_stem(torch.from_numpy(x)).shape[2:] == (
        31,
        63,
    )  # unpadded, not 32 x 64
    with torch.no_grad():
        ref = spotid(torch.from_numpy(x)).numpy()
    out = np.asarray(
        jax.jit(lambda v, x: model.apply(v, x, train=False))(variables, x.transpose(0, 2, 3, 1))
    )
    assert out.dtype == np.float32 and out.shape == (2, 1024)
    assert np.abs(out - ref).max() <= 1e-4 * np.abs(ref).max()
    ours = sum(np.size(p) for p in jax.tree.leaves(variables["params"]))
    assert ours == sum(p.numel() for p in spotid.parameters())


@pytest.mark.parametrize("prefix", ["", "backbone.", "model.", "module.backbone."])
def test_spotid_key_prefixes(spotid, prefix):
    state = {
        prefix + k if not k.startswith("embedding_layer") else k: v.numpy()
        for k, v in spotid.state_dict().items()
    }
    variables, kwargs = convert.convert_spotid(convert.normalize_state_dict(state), BACKBONE)
    np.testing.assert_array_equal(
        variables["params"]["embedding"]["kernel"], state["embedding_layer.weight"].T
    )
    assert kwargs["in_chans"] == 4 and kwargs["stem_padding"] == 0


def test_three_channel_spotid_keeps_timm_stem():
    torch.manual_seed(2)
    state = convert.normalize_state_dict(SpotIDNetwork(in_chans=3).state_dict())
    _, kwargs = convert.convert_spotid(state, BACKBONE)
    assert kwargs["in_chans"] == 3 and kwargs["stem_padding"] == "tf_same"


def test_safetensors_and_pth_agree(timm_state, tmp_path):
    from safetensors.numpy import save_file

    save_file({k: v.numpy() for k, v in timm_state.items()}, str(tmp_path / "w.safetensors"))
    torch.save({"state_dict": timm_state}, tmp_path / "w.pth")
    a = convert.load_timm_backbone(tmp_path / "w.safetensors", BACKBONE, 4)
    b = convert.load_timm_backbone(tmp_path / "w.pth", BACKBONE, 4)
    assert "classifier" not in a["params"]  # a feature backbone drops the ImageNet classifier
    jax.tree.map(np.testing.assert_array_equal, a, b)
    dw = timm_state["blocks.3.0.conv_dw.weight"].numpy()
    np.testing.assert_array_equal(
        a["params"]["blocks_3_0"]["conv_dw"]["kernel"], dw.transpose(2, 3, 1, 0)
    )
    np.testing.assert_array_equal(
        a["batch_stats"]["bn1"]["var"], timm_state["bn1.running_var"].numpy()
    )


def test_timm_cli_writes_a_model_with_a_seeded_head(timm_state, tmp_path):
    torch.save(timm_state, tmp_path / "w.pth")
    for out in ("m1", "m2"):
        args = [
            "--timm",
            str(tmp_path / "w.pth"),
            "--backbone",
            BACKBONE,
            "--in-chans",
            "4",
            "--out",
            str(tmp_path / out),
        ]
        assert convert.main(args) == 0
    d1, v1 = model_io.load_model(tmp_path / "m1")
    _, v2 = model_io.load_model(tmp_path / "m2")
    assert d1["model"]["head"] == "pooled" and d1["input"] == {"height": 256, "width": 512}
    jax.tree.map(np.testing.assert_array_equal, v1, v2)  # same seed, same head
    model = EmbeddingModel(**d1["model"])
    shapes = jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0), jnp.zeros((1, 32, 32, 4))))
    assert jax.tree.map(np.shape, shapes) == jax.tree.map(np.shape, v1)


def test_wrong_backbone_is_refused(timm_state, tmp_path):
    torch.save(timm_state, tmp_path / "b0.pth")
    with pytest.raises(convert.ConvertError, match="b0.pth.*--backbone"):
        convert.load_timm_backbone(tmp_path / "b0.pth", "efficientnetv2_b2", 4)
    with pytest.raises(convert.ConvertError, match="b0.pth"):
        convert.load_timm_backbone(tmp_path / "b0.pth", "resnet18", 4)


def test_unused_tensors_are_refused(timm_state, tmp_path):
    state = dict(timm_state, **{"extra.weight": torch.zeros(3)})
    torch.save(state, tmp_path / "w.pth")
    with pytest.raises(convert.ConvertError, match="not used"):
        convert.load_timm_backbone(tmp_path / "w.pth", BACKBONE, 4)


def test_bad_files_give_one_line_errors(tmp_path, capsys):
    with pytest.raises(convert.ConvertError, match="no such file"):
        convert.read_state_dict(tmp_path / "missing.pth")
    (tmp_path / "junk.safetensors").write_bytes(b"not a checkpoint")
    with pytest.raises(convert.ConvertError, match="junk.safetensors"):
        convert.read_state_dict(tmp_path / "junk.safetensors")
    torch.save({"optimizer": {"lr": 1}}, tmp_path / "opt.pth")
    with pytest.raises(convert.ConvertError, match="no state dict"):
        convert.read_state_dict(tmp_path / "opt.pth")
    assert (
        convert.main(
            [
                "--timm",
                str(tmp_path / "missing.pth"),
                "--backbone",
                BACKBONE,
                "--out",
                str(tmp_path / "o"),
            ]
        )
        == 2
    )
    err = capsys.readouterr().err.strip()
    assert "missing.pth" in err and "\n" not in err
    assert not (tmp_path / "o").exists()


def test_help_works(capsys):
    with pytest.raises(SystemExit) as e:
        convert.main(["--help"])
    assert e.value.code == 0 and "--spotid" in capsys.readouterr().out


def test_training_from_a_spotid_checkpoint_starts_from_its_embeddings(spotid, tmp_path):
    """`init.kind=spotid`: the train state built by `state.load_init` + `build_model` embeds
    like the PyTorch checkpoint, unpadded stem included (exported description says so too)."""
    from configs import default
    from leopard_jax.train import state as ts

    path = tmp_path / "spotid.pth"
    torch.save(spotid.state_dict(), path)
    config = default.get_config()
    config.unlock()
    config.init.kind, config.init.path = "spotid", str(path)
    config.model.update(backbone=BACKBONE, head="spotid", dims=1024)
    init_variables, fixed = ts.load_init(config)
    assert fixed == {"stem_padding": 0}
    assert ts.model_kwargs(config.model, **fixed)["stem_padding"] == 0
    model = ts.build_model(config.model, axis_name=None, **fixed)
    tx = ts.make_optimizer(config, steps_per_epoch=1)
    state = ts.init_state(
        config, model, num_classes=3, input_shape=(64, 128, 4), tx=tx, init_variables=init_variables
    )
    x = np.random.default_rng(1).standard_normal((2, 4, 64, 128), dtype=np.float32)
    with torch.no_grad():
        ref = spotid(torch.from_numpy(x)).numpy()
    variables = {"params": state.params["model"], "batch_stats": state.batch_stats}
    out = np.asarray(model.apply(variables, x.transpose(0, 2, 3, 1), train=False))
    assert np.abs(out - ref).max() <= 1e-4 * np.abs(ref).max()
