"""embed + embeddings_io: spotID import parity against PyTorch, the real 45-photo set,
--update appending only new records, and clear errors on mismatched inputs."""

from __future__ import annotations

import gc
import json
import pathlib
import weakref

import cv2
import jax
import numpy as np
import pytest

from leopard_jax import embed, embeddings_io, export, inference, model_io, parallel
from leopard_jax.data import records

DATA = pathlib.Path(__file__).resolve().parents[2] / "shared" / "data"
MINIMUM = DATA / "spotid_minimum"
HEIGHT, WIDTH = 32, 64  # small: the CPU is shared; the parity test uses its own size
PARITY_HW = (64, 128)
BATCH = 8
IMAGENET_MEAN = np.array([0.485, 0.456, 0.406, 0.456], np.float32)  # written out: the reference
IMAGENET_STD = np.array([0.229, 0.224, 0.225, 0.225], np.float32)  # must not import normalize()

needs_minimum = pytest.mark.skipif(not MINIMUM.is_dir(), reason=f"{MINIMUM} not present")


# --------------------------------------------------------------------------- helpers


def minimum_items(height: int = HEIGHT, width: int = WIDTH):
    """(row, uint8 H×W×4) for the spotID photos: RGB crop + its binary edge map, resized."""
    for photo in sorted((MINIMUM / "cropped").glob("*/*.jpg")):
        folder = photo.parent.name  # e.g. "BGL09_right": identity + flank
        identity, flank = folder.rsplit("_", 1)
        rgb = cv2.cvtColor(cv2.imread(str(photo)), cv2.COLOR_BGR2RGB)
        edge = cv2.imread(str(MINIMUM / "binary" / folder / photo.name), cv2.IMREAD_GRAYSCALE)
        image = np.dstack(
            [
                cv2.resize(rgb, (width, height), interpolation=cv2.INTER_AREA),
                cv2.resize(edge, (width, height), interpolation=cv2.INTER_AREA),
            ]
        )
        key = f"{folder}/{photo.stem}#0"
        row = {
            "key": key,
            "source": str(photo),
            "identity": identity,
            "flank": flank.lower(),
            "crop": f"crops/{key}.jpg",
            "edge": f"edges/{key}.jpg",
        }
        yield row, image


def write_dataset(
    root: pathlib.Path, items, shard: str = "a", height: int = HEIGHT, width: int = WIDTH
):
    """A dataset dir as preprocess writes it: settings, one shard, crop/edge JPEGs."""
    root.mkdir(parents=True, exist_ok=True)
    records.save_settings(root, {"height": height, "width": width, "channels": 4})
    items = list(items)
    for row, image in items:
        for sub, pixels in (("crop", image[..., 2::-1]), ("edge", image[..., 3])):
            path = root / row[sub]
            path.parent.mkdir(parents=True, exist_ok=True)
            cv2.imwrite(str(path), np.ascontiguousarray(pixels))
    records.write_records(root, shard, items)
    return root


def synthetic_items(n: int, seed: int = 0, height: int = HEIGHT, width: int = WIDTH):
    rng = np.random.default_rng(seed)
    for i in range(n):
        row = {
            "key": f"syn/{i:03d}#0",
            "source": f"/photos/{i}.jpg",
            "identity": f"id{i % 3}",
            "flank": "",
            "crop": f"crops/syn/{i:03d}.jpg",
            "edge": f"edges/syn/{i:03d}.jpg",
        }
        yield row, rng.integers(0, 256, (height, width, 4), dtype=np.uint8)


def random_variables(model, shape, seed: int, *, kernel_gain=2.0, var_spread=0.5, noise=0.1):
    """Seeded random weights and batch-norm statistics from the variable shapes alone
    (jax.eval_shape): no compilation of `init`, which costs more than the tests on CPU.
    Kernels ~ N(0, kernel_gain / fan_in), variances in 1 ± var_spread, scales, biases and
    means perturbed by `noise`."""
    import jax
    import jax.numpy as jnp

    rng = np.random.default_rng(seed)

    def fill(path, leaf):
        name, size = path[-1].key, leaf.shape
        if name == "kernel":
            fan_in = np.prod(size[:-1])
            return rng.normal(0, np.sqrt(kernel_gain / fan_in), size).astype(np.float32)
        if name == "var":
            return rng.uniform(1 - var_spread, 1 + var_spread, size).astype(np.float32)
        if name == "scale":
            return (1 + noise * rng.normal(size=size)).astype(np.float32)
        return (noise * rng.normal(size=size)).astype(np.float32)  # bias, mean

    shapes = jax.eval_shape(model.init, jax.random.PRNGKey(0), jnp.zeros(shape))
    return jax.tree_util.tree_map_with_path(fill, shapes)


def save_random_model(
    model_dir: pathlib.Path, seed: int, backbone: str = "resnet18", dims: int = 32
):
    from leopard_jax.models.embedding import EmbeddingModel

    variables = random_variables(EmbeddingModel(backbone, dims=dims), (1, HEIGHT, WIDTH, 4), seed)
    description = {
        "model": {"backbone": backbone, "head": "pooled", "dims": dims, "in_chans": 4},
        "input": {"height": HEIGHT, "width": WIDTH},
        "info": {"source": "test", "step": seed},
    }
    model_io.save_model(model_dir, variables, description)
    return model_dir


class CountingEmbed:
    """Wraps inference.embed_images (the one embed path) to count the images reaching the model."""

    def __init__(self, monkeypatch):
        self.images = 0
        original = inference.embed_images

        def counted(model, variables, images, **kw):
            self.images += len(images)
            return original(model, variables, images, **kw)

        monkeypatch.setattr(inference, "embed_images", counted)


# --------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return save_random_model(tmp_path_factory.mktemp("model") / "m", seed=0)


@pytest.fixture(scope="module")
def onnx_file(model_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("onnx") / "model.onnx"
    assert export.main(["--checkpoint", str(model_dir), "--out", str(out)]) == 0
    return out


@pytest.fixture(scope="module")
def synthetic(tmp_path_factory):
    return write_dataset(tmp_path_factory.mktemp("syn") / "data", synthetic_items(11))


# --------------------------------------------------------------------------- spotID parity


def spotid_torch_model():
    """spotID's EmbeddingNetwork for tf_efficientnetv2_b2 with 4 input channels, as its
    code builds it: timm model, conv_stem replaced by a plain nn.Conv2d copying the old
    stem's attributes (padding (0, 0): timm's Conv2dSame pads inside forward), classifier
    kept, embedding_layer Linear(1000 -> 1024), L2-normalise, scale s = 64."""
    import timm
    import torch
    from torch import nn

    class EmbeddingNetwork(nn.Module):
        def __init__(self):
            super().__init__()
            backbone = timm.create_model("tf_efficientnetv2_b2", pretrained=False)
            old = backbone.conv_stem
            backbone.conv_stem = nn.Conv2d(
                4,
                old.out_channels,
                old.kernel_size,
                old.stride,
                old.padding,
                bias=old.bias is not None,
            )
            self.final_backbone = backbone
            self.embedding_layer = nn.Linear(backbone.classifier.out_features, 1024)

        def forward(self, x):
            return 64.0 * nn.functional.normalize(
                self.embedding_layer(self.final_backbone(x)), dim=1
            )

    torch.manual_seed(0)
    net = EmbeddingNetwork().eval()
    generator = torch.Generator().manual_seed(1)
    # Batch-norm statistics off their defaults, so a mis-mapped BN shows; mildly, because
    # stronger ones make the random net so ill-conditioned that torch float32 and float64
    # disagree beyond 1e-4 (var in [0.5, 1.5]: cosine 0.9997), and the test would measure that.
    with torch.no_grad():
        for m in net.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.copy_(0.05 * torch.randn(m.num_features, generator=generator))
                m.running_var.copy_(0.9 + 0.2 * torch.rand(m.num_features, generator=generator))
                m.weight.copy_(1 + 0.05 * torch.randn(m.num_features, generator=generator))
                m.bias.copy_(0.05 * torch.randn(m.num_features, generator=generator))
    return net


@needs_minimum
@pytest.mark.slow
def test_spotid_checkpoint_through_embed_matches_pytorch(tmp_path):
    torch = pytest.importorskip("torch")
    pytest.importorskip("timm")
    from leopard_jax.models import convert

    net = spotid_torch_model()
    pth = tmp_path / "spotid.pth"
    torch.save(net.state_dict(), pth)
    converted = tmp_path / "imported"
    height, width = PARITY_HW
    assert (
        convert.main(
            [
                "--spotid",
                str(pth),
                "--backbone",
                "efficientnetv2_b2",
                "--out",
                str(converted),
                "--height",
                str(height),
                "--width",
                str(width),
            ]
        )
        == 0
    )
    items = list(minimum_items(height, width))[::9]  # 5 photos, spread over the identities
    data = write_dataset(tmp_path / "data", items, height=height, width=width)
    out = embed.run(
        converted, data, tmp_path / "e.npz", batch_size=4, progress=False, log=lambda _: None
    )

    uint8 = np.stack([image for _, image in items]).astype(np.float32)
    tensor = torch.from_numpy(
        ((uint8 / 255 - IMAGENET_MEAN) / IMAGENET_STD).transpose(0, 3, 1, 2).copy()
    )
    with torch.no_grad():
        reference = net(tensor).numpy()
    reference /= np.linalg.norm(reference, axis=1, keepdims=True)
    assert (
        np.max(reference @ reference.T - np.eye(len(items))) < 0.99
    )  # images tell apart: order matters
    assert [r["key"] for r, _ in items] == out.keys.tolist()
    cosine = np.sum(out.embeddings * reference, axis=1)
    assert np.all(cosine >= 0.9999), cosine


# --------------------------------------------------------------------------- the real photo set


@needs_minimum
def test_minimum_set_then_update_embeds_only_the_new_photo(tmp_path, model_dir, monkeypatch):
    items = list(minimum_items())
    assert len(items) == 45
    new_row, new_image = items.pop(17)
    data = write_dataset(tmp_path / "data", items, shard="a")
    out_path = tmp_path / "emb.npz"
    assert (
        embed.main(
            [
                "--checkpoint",
                str(model_dir),
                "--data",
                str(data),
                "--out",
                str(out_path),
                "--batch-size",
                str(BATCH),
                "--no-progress",
            ]
        )
        == 0
    )
    first = embeddings_io.read(out_path)
    assert len(first) == 44

    write_dataset(data, [(new_row, new_image)], shard="b")
    counter, lines = CountingEmbed(monkeypatch), []
    embed.run(
        model_dir, data, out_path, batch_size=BATCH, update=True, progress=False, log=lines.append
    )
    assert counter.images == 1
    assert lines == [f"embedded 1 new records (44 kept) -> {out_path} [45 x 32]"]

    result = embeddings_io.read(out_path)
    assert len(result) == 45 and result.embeddings.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(result.embeddings, axis=1), 1.0, atol=1e-5)
    np.testing.assert_array_equal(result.embeddings[:44], first.embeddings)  # kept as they were
    assert result.keys[-1] == new_row["key"]
    expected = {
        f"{p.parent.name}/{p.stem}#0": p.parent.name.rsplit("_", 1)[0]
        for p in (MINIMUM / "cropped").glob("*/*.jpg")
    }
    assert dict(zip(result.keys.tolist(), result.identities.tolist())) == expected
    assert sorted(set(result.identities)) == ["BGL09", "BHA32", "BRL17", "CUL66"]
    assert set(result.flanks) == {"left", "right"}
    assert all(pathlib.Path(p).is_file() for p in np.concatenate([result.crops, result.edges]))
    assert all(pathlib.Path(p).is_file() for p in result.paths)
    assert result.meta["dataset"] == str(data.absolute())
    assert result.meta["model"]["model"]["backbone"] == "resnet18"
    assert result.meta["preprocessing"]["height"] == HEIGHT and result.meta["checkpoint_step"] == 0

    counter.images = 0  # a second update finds nothing new and leaves the file alone
    embed.run(
        model_dir, data, out_path, batch_size=BATCH, update=True, progress=False, log=lines.append
    )
    assert counter.images == 0 and "nothing new" in lines[-1]


# --------------------------------------------------------------------------- batching


def test_rows_keep_their_embedding_whatever_batch_and_order(synthetic, model_dir):
    """Padding the last batch and the record order must not change any row's embedding."""
    description, variables = model_io.load_model(model_dir)
    model = model_io.build_model(description)
    rows = records.read_manifest(synthetic)
    forward = inference.embed_images(
        model, variables, records.RecordSource(synthetic), batch_size=BATCH
    )
    backward = inference.embed_images(
        model, variables, records.RecordSource(synthetic, rows[::-1]), batch_size=BATCH
    )
    assert forward.shape == (11, 32)
    np.testing.assert_allclose(backward[::-1], forward, atol=1e-5)
    assert np.linalg.matrix_rank(forward) > 1  # rows are really different images
    via_library = embed.embed_dataset(model_dir, synthetic, batch_size=BATCH)
    np.testing.assert_allclose(via_library, forward, atol=1e-6)


def test_jax_backend_keeps_only_the_devices_copy_of_the_weights(synthetic, model_dir, monkeypatch):
    """embed sends the weights to the devices once and keeps no host copy beside them (on a
    CPU that was a second copy of the weights in the process: 36 of B2's 45 MB), and embeds
    as with the host copy. A host array JAX took over without copying is the devices' copy."""
    description, variables = model_io.load_model(model_dir)
    expected = inference.embed_images(
        model_io.build_model(description),
        variables,
        records.RecordSource(synthetic),
        batch_size=BATCH,
    )
    load_model, replicate = model_io.load_model, parallel.replicate
    host, on_devices = [], []

    def watched_load_model(path):
        loaded_description, loaded = load_model(path)
        host.extend(weakref.ref(leaf) for leaf in jax.tree.leaves(loaded))
        return loaded_description, loaded

    def watched_replicate(tree, devices=None):
        out = replicate(tree, devices)
        on_devices.extend(jax.tree.leaves(out))
        return out

    monkeypatch.setattr(model_io, "load_model", watched_load_model)
    monkeypatch.setattr(parallel, "replicate", watched_replicate)
    loaded = embed.load(model_dir, "jax", "float32", records.load_settings(synthetic), synthetic)
    gc.collect()
    device_buffers = {x.addressable_data(0).unsafe_buffer_pointer() for x in on_devices}
    kept = [ref() for ref in host if ref() is not None]
    assert host and on_devices
    assert [a.shape for a in kept if a.ctypes.data not in device_buffers] == []
    got = embed.embed_rows(loaded, synthetic, None, batch_size=BATCH, progress=False)
    np.testing.assert_allclose(got, expected, atol=1e-6)


def test_bfloat16_stays_close_to_float32(synthetic, model_dir, tmp_path):
    full = embed.run(
        model_dir,
        synthetic,
        tmp_path / "f.npz",
        batch_size=BATCH,
        progress=False,
        log=lambda _: None,
    )
    half = embed.run(
        model_dir,
        synthetic,
        tmp_path / "h.npz",
        batch_size=BATCH,
        dtype="bfloat16",
        progress=False,
        log=lambda _: None,
    )
    assert half.embeddings.dtype == np.float32 and half.meta["dtype"] == "bfloat16"
    assert np.min(np.sum(full.embeddings * half.embeddings, axis=1)) > 0.99


# --------------------------------------------------------------------------- backends


def test_onnx_backend_writes_the_same_embeddings(synthetic, model_dir, onnx_file, tmp_path):
    """ONNX Runtime (a .onnx file, or the model dir exported in memory) and JAX write the
    same file within 1e-4; the meta says which ran, and --update mixes them (same weights)."""
    quiet = {"batch_size": BATCH, "progress": False, "log": lambda _: None}
    on_jax = embed.run(model_dir, synthetic, tmp_path / "j.npz", backend="jax", **quiet)
    assert (
        embed.main(
            ["--checkpoint", str(onnx_file), "--data", str(synthetic), "--out"]
            + [str(tmp_path / "o.npz"), "--backend", "onnx", "--no-progress"]
        )
        == 0
    )
    from_file = embeddings_io.read(tmp_path / "o.npz")
    in_memory = embed.run(model_dir, synthetic, tmp_path / "m.npz", backend="onnx", **quiet)
    assert on_jax.meta["backend"] == "jax"
    for result in (from_file, in_memory):
        assert result.meta["backend"] == "onnx"
        assert result.meta["model_fingerprint"] == on_jax.meta["model_fingerprint"]
        assert result.meta["model"]["model"]["backbone"] == "resnet18"
        np.testing.assert_array_equal(result.keys, on_jax.keys)
        np.testing.assert_allclose(result.embeddings, on_jax.embeddings, atol=1e-4)
        assert np.min(np.sum(result.embeddings * on_jax.embeddings, axis=1)) >= 0.99999
    lines = []
    embed.run(
        onnx_file, synthetic, tmp_path / "j.npz", backend="auto", update=True, log=lines.append
    )
    assert "nothing new" in lines[-1]


def test_backend_misuse_is_a_one_line_error(synthetic, model_dir, onnx_file, tmp_path, capsys):
    small = write_dataset(
        tmp_path / "small", synthetic_items(2, height=16, width=64), height=16, width=64
    )
    cases = [
        ([str(onnx_file), str(small), "onnx"], "16x64 (HxW) but the model in"),
        ([str(onnx_file), str(synthetic), "jax"], "pass --backend onnx, or the model dir"),
        ([str(model_dir), str(synthetic), "onnx", "--dtype", "bfloat16"], "pass --backend jax"),
    ]
    for (checkpoint, data, backend, *rest), message in cases:
        argv = ["--checkpoint", checkpoint, "--data", data, "--backend", backend, *rest]
        assert embed.main(argv + ["--out", str(tmp_path / "e.npz")]) == 2
        err = capsys.readouterr().err
        assert message in err and err.count("\n") == 1, err
    assert not (tmp_path / "e.npz").exists()


# --------------------------------------------------------------------------- refusals


def test_update_refuses_a_file_from_another_model(synthetic, model_dir, tmp_path, capsys):
    out = tmp_path / "e.npz"
    first = embed.run(
        model_dir, synthetic, out, batch_size=BATCH, progress=False, log=lambda _: None
    )
    other = save_random_model(tmp_path / "other", seed=1)
    with pytest.raises(embed.EmbedError, match="different model"):
        embed.run(other, synthetic, out, batch_size=BATCH, update=True, progress=False)
    assert (
        embed.main(
            [
                "--checkpoint",
                str(model_dir),
                "--data",
                str(synthetic),
                "--out",
                str(out),
                "--update",
                "--dtype",
                "bfloat16",
            ]
        )
        == 2
    )
    assert "--dtype float32" in capsys.readouterr().err
    np.testing.assert_array_equal(embeddings_io.read(out).embeddings, first.embeddings)  # untouched
    assert sorted(p.name for p in tmp_path.iterdir()) == ["e.npz", "other"]  # no temp files left


def test_wrong_input_size_is_a_one_line_error(tmp_path, model_dir, capsys):
    data = write_dataset(
        tmp_path / "small", synthetic_items(2, height=16, width=64), height=16, width=64
    )
    code = embed.main(
        ["--checkpoint", str(model_dir), "--data", str(data), "--out", str(tmp_path / "e.npz")]
    )
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1
    assert "16x64" in err and "32x64" in err
    assert "--config.render.height=32 --config.render.width=64" in err  # preprocess's real flags
    assert not (tmp_path / "e.npz").exists()


def test_bad_paths_are_one_line_errors(tmp_path, model_dir, synthetic, capsys):
    empty = tmp_path / "empty"
    empty.mkdir()
    records.save_settings(empty, {"height": HEIGHT, "width": WIDTH, "channels": 4})
    cases = [
        (["--checkpoint", str(tmp_path / "nope"), "--data", str(synthetic)], "no model.json"),
        (
            ["--checkpoint", str(model_dir), "--data", str(tmp_path / "nodata")],
            "settings.json: not found",
        ),
        (["--checkpoint", str(model_dir), "--data", str(empty)], "no records"),
    ]
    for argv, message in cases:
        assert embed.main(argv + ["--out", str(tmp_path / "e.npz")]) == 2
        err = capsys.readouterr().err
        assert message in err and err.count("\n") == 1, err
    with pytest.raises(SystemExit) as exit_info:
        embed.main(["--help"])
    assert exit_info.value.code == 0


# --------------------------------------------------------------------------- the file format


def test_npz_round_trip_and_append(tmp_path):
    rng = np.random.default_rng(0)
    vectors = rng.normal(size=(4, 3)).astype(np.float32)
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    data = embeddings_io.make(
        vectors, meta={"model": {"dims": 3}}, keys=list("abcd"), identities=["x", "", "ü", "y"]
    )
    path = tmp_path / "e.npz"
    embeddings_io.write(path, data)
    back = embeddings_io.read(path)
    np.testing.assert_array_equal(back.embeddings, vectors)
    assert back.keys.tolist() == list("abcd") and back.identities.tolist() == ["x", "", "ü", "y"]
    assert back.flanks.tolist() == [""] * 4 and back.meta == {"model": {"dims": 3}}
    with np.load(path, allow_pickle=False) as raw:  # any numpy reads it, no pickle
        assert set(raw.files) == {"embeddings", "meta", *embeddings_io.STRING_FIELDS}
        assert json.loads(str(raw["meta"])) == {"model": {"dims": 3}}
    both = embeddings_io.concat(back, embeddings_io.select(back, np.array([2, 0])))
    assert both.keys.tolist() == list("abcdca")
    np.testing.assert_array_equal(both.embeddings[4:], vectors[[2, 0]])


def test_unreadable_files_name_the_file(tmp_path):
    corrupt = tmp_path / "corrupt.npz"
    corrupt.write_bytes(b"not a zip")
    with pytest.raises(embeddings_io.EmbeddingsFileError, match="corrupt.npz: not a readable"):
        embeddings_io.read(corrupt)
    with pytest.raises(embeddings_io.EmbeddingsFileError, match="missing.npz: not found"):
        embeddings_io.read(tmp_path / "missing.npz")
    scaled = tmp_path / "scaled.npz"
    np.savez(scaled, embeddings=np.full((2, 2), 64.0, np.float32), keys=np.array(["a", "b"]))
    with pytest.raises(embeddings_io.EmbeddingsFileError, match="not unit norm"):
        embeddings_io.read(scaled)
    with pytest.raises(embeddings_io.EmbeddingsFileError, match="must end in .npz"):
        embeddings_io.write(tmp_path / "e.np", embeddings_io.make(np.eye(2)))
