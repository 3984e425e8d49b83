"""grain pipeline over a records dataset written from synthetic photos."""

import collections
import gc
import sys
from multiprocessing import shared_memory

import numpy as np
import pytest
from grain._src.python.ipc import shared_memory_array

from leopard_jax.data import augment, pipeline, records, synthetic

H, W = 32, 64
IDENTITIES, PER_IDENTITY = 9, 5


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    path = tmp_path_factory.mktemp("dataset")
    n = synthetic.write_records_dataset(
        path, IDENTITIES, PER_IDENTITY, seed=3, height=H, width=W, photo_height=96, photo_width=128
    )
    assert n == IDENTITIES * PER_IDENTITY
    rows = records.read_manifest(path)
    # one singleton identity, so the drop/keep setting matters
    rows = [
        r for r in rows if not (r["identity"] == "A004_left" and not r["key"].endswith("_000#0"))
    ]
    return path, rows


def _batches(epoch):
    return [dict(b) for b in epoch]


def test_records_round_trip_the_rendered_photos(dataset):
    """Records and manifest read back exactly what the generator rendered."""
    path, _ = dataset
    rows = records.read_manifest(path)
    source = records.RecordSource(path)
    assert records.load_settings(path)["height"] == H and len(source) == len(rows)
    expected = list(synthetic.photos(IDENTITIES, PER_IDENTITY, seed=3, height=96, width=128))
    for i in (0, 7, len(rows) - 1):
        identity, flank, stem, photo = expected[i]
        assert (rows[i]["identity"], rows[i]["flank"], rows[i]["index"]) == (
            identity,
            flank,
            str(i),
        )
        crop = synthetic.cv2.resize(photo, (W, H), interpolation=synthetic.cv2.INTER_AREA)
        np.testing.assert_array_equal(source[i][..., :3], crop[..., ::-1])
        np.testing.assert_array_equal(source[i][..., 3], synthetic.simple_edges(crop))
        assert (path / rows[i]["crop"]).is_file() and (path / rows[i]["edge"]).is_file()


def test_train_epoch_uses_every_kept_image_once(dataset):
    path, rows = dataset
    epoch = pipeline.train_loader(rows, path, global_batch=8, seed=0, epoch=0, num_devices=2)
    batches = _batches(epoch)
    assert len(batches) == len(epoch) == -(-(len(rows) - 1) // 8)
    classes = pipeline.class_names(rows, keep_singletons=False)
    assert "A004_left" not in classes and len(classes) == IDENTITIES - 1
    labels = np.concatenate([b["label"][b["mask"]] for b in batches])
    expected = collections.Counter(
        classes.index(r["identity"]) for r in rows if r["identity"] in classes
    )
    assert collections.Counter(labels.tolist()) == expected
    for b in batches:
        assert b["image"].shape == (8, H, W, 4) and b["image"].dtype == np.float32
        assert b["label"].dtype == np.int32 and b["mask"].dtype == bool
        assert (b["label"][~b["mask"]] == -1).all()
        for shard in b["label"].reshape(2, 4):  # groups of <= 4 fill device shards
            counts = collections.Counter(shard[shard >= 0].tolist())
            assert max(counts.values()) <= 4


def test_images_are_the_augmented_records(dataset):
    """Each train image is normalize(augment(record, rng(seed, epoch, position)))."""
    path, rows = dataset
    table = pipeline.train_table(rows, global_batch=8, seed=5, epoch=2, num_devices=1)
    batch = next(
        iter(pipeline.train_loader(rows, path, global_batch=8, seed=5, epoch=2, num_devices=1))
    )
    source = records.RecordSource(path, rows)
    for slot in (0, 5):
        rng = np.random.default_rng([5, 2, slot])
        expected = augment.normalize(
            augment.augment(source[table[0, slot]], rng, augment.AugmentConfig())
        )
        np.testing.assert_array_equal(batch["image"][slot], expected)


def test_unnormalised_batches_are_uint8_and_normalise_to_the_same(dataset):
    path, rows = dataset
    kw = dict(global_batch=8, seed=4, epoch=0, num_devices=2)
    floats = next(iter(pipeline.train_loader(rows, path, **kw)))
    raw = next(iter(pipeline.train_loader(rows, path, normalize=False, **kw)))
    assert raw["image"].dtype == np.uint8
    np.testing.assert_array_equal(augment.normalize(raw["image"]), floats["image"])
    np.testing.assert_array_equal(raw["label"], floats["label"])


def test_process_slices_are_columns_of_the_global_batch(dataset):
    path, rows = dataset
    kw = dict(global_batch=8, seed=1, epoch=0, num_devices=4)
    whole = _batches(pipeline.train_loader(rows, path, **kw))
    parts = [
        _batches(pipeline.train_loader(rows, path, process_index=p, process_count=2, **kw))
        for p in range(2)
    ]
    assert len(parts[0]) == len(parts[1]) == len(whole)
    for w, a, b in zip(whole, *parts):
        for key in w:
            np.testing.assert_array_equal(w[key], np.concatenate([a[key], b[key]]))


def test_same_stream_for_same_seed_and_epoch(dataset):
    path, rows = dataset
    kw = dict(global_batch=8, seed=1, num_devices=1)
    a = _batches(pipeline.train_loader(rows, path, epoch=0, **kw))
    b = _batches(pipeline.train_loader(rows, path, epoch=0, **kw))
    c = _batches(pipeline.train_loader(rows, path, epoch=1, **kw))
    assert all(np.array_equal(x[k], y[k]) for x, y in zip(a, b) for k in x)
    assert not np.array_equal(
        np.concatenate([x["label"] for x in a]), np.concatenate([x["label"] for x in c])
    )


def test_a_multi_epoch_stream_is_the_epochs_in_sequence(dataset):
    path, rows = dataset
    kw = dict(global_batch=8, seed=1, num_devices=2)
    stream = pipeline.train_loader(rows, path, epoch=3, num_epochs=2, **kw)
    single = _batches(pipeline.train_loader(rows, path, epoch=3, **kw)) + _batches(
        pipeline.train_loader(rows, path, epoch=4, **kw)
    )
    assert stream.steps == len(single) and stream.steps_per_epoch == len(single) // 2
    for a, b in zip(_batches(stream), single, strict=True):
        for key in a:
            np.testing.assert_array_equal(a[key], b[key])


def _state_round_trip(path, rows, worker_count):
    kw = dict(
        global_batch=8,
        seed=2,
        epoch=1,
        num_devices=2,
        worker_count=worker_count,
        keep_singletons=True,
    )
    it = iter(pipeline.train_loader(rows, path, **kw))
    for _ in range(2):
        next(it)
    state = it.get_state()
    after = [next(it) for _ in range(2)]
    resumed = iter(pipeline.train_loader(rows, path, **kw))
    resumed.set_state(state)
    for a, b in zip(after, [next(resumed) for _ in range(2)]):
        for key in a:
            np.testing.assert_array_equal(a[key], b[key])
    return after


def test_iterator_state_round_trip(dataset):
    _state_round_trip(*dataset, worker_count=0)


def test_worker_processes_give_the_same_stream_and_state(dataset):
    """Randomness comes from positions, not workers: 1 worker process == in-process."""
    in_process = _state_round_trip(*dataset, worker_count=0)
    with_worker = _state_round_trip(*dataset, worker_count=1)
    for a, b in zip(in_process, with_worker):
        for key in a:
            np.testing.assert_array_equal(a[key], b[key])


def test_batches_from_worker_processes_are_in_this_processs_own_memory(dataset):
    """Not views of a worker's shared-memory segment: on the CPU backend the devices would
    alias it, and JAX lets go of aliased host memory late (see `_out_of_shared_memory`)."""
    path, rows = dataset
    data = pipeline.train_loader(
        rows, path, global_batch=8, seed=0, epoch=0, num_devices=1, worker_count=1
    )
    try:
        batch = next(iter(data))
    finally:
        data.close()
    assert batch
    for key, value in batch.items():
        assert type(value) is np.ndarray and value.base is None, (key, type(value))


def _segment_exists(name: str) -> bool:
    try:
        shared_memory.SharedMemory(name).close()  # (attached only to ask)
    except FileNotFoundError:
        return False
    return True


def _worker_array(value) -> shared_memory_array.SharedMemoryArray:
    """An array as grain hands it over from a worker: in a segment this process unlinks."""
    array = shared_memory_array.SharedMemoryArray(np.shape(value), np.float32)
    array[...] = value
    array.unlink_on_del()
    return array


def test_a_batch_read_from_shared_memory_unlinks_its_segments_once(monkeypatch):
    """The copy unlinks the segment at once; grain's deleter must not unlink it again
    (that would raise in its `__del__`)."""
    unraisable = []
    monkeypatch.setattr(sys, "unraisablehook", unraisable.append)
    leaf = _worker_array(np.arange(6.0).reshape(2, 3))
    name = leaf.shm.name
    batch = pipeline._out_of_shared_memory({"image": leaf, "label": np.int32(3)})
    assert not _segment_exists(name)
    np.testing.assert_array_equal(batch["image"], np.arange(6.0).reshape(2, 3))
    assert type(batch["image"]) is np.ndarray and batch["image"].base is None
    del leaf
    gc.collect()
    assert unraisable == []


def test_release_unlinks_batches_held_in_cycles_and_any_dropped_later():
    """grain's iterators hold batches in reference cycles and it unlinks from a background
    thread: release collects and waits; a batch dropped after it is unlinked at once."""
    shared_memory_array.SharedMemoryArray.enable_async_del(1)  # as a worker stream does
    cycle = {"batch": _worker_array(np.ones(4))}
    cycle["self"] = cycle
    in_cycle = cycle["batch"].shm.name
    late = _worker_array(np.zeros(4))
    late_name = late.shm.name
    del cycle
    pipeline.release_shared_memory()
    assert not _segment_exists(in_cycle)
    del late
    assert not _segment_exists(late_name)


def test_bad_inputs_fail_clearly(dataset, tmp_path):
    path, rows = dataset
    with pytest.raises(ValueError, match="no training images"):
        pipeline.train_loader(rows[:1], path, global_batch=8, seed=0, epoch=0, num_devices=1)
    with pytest.raises(ValueError, match="multiple of num_shards"):
        pipeline.train_loader(rows, path, global_batch=6, seed=0, epoch=0, num_devices=4)
    with pytest.raises(records.DatasetError, match="settings.json"):
        pipeline.train_loader(rows, tmp_path, global_batch=8, seed=0, epoch=0, num_devices=1)


def test_device_augmentation_ships_raw_records_with_the_drawn_parameters(dataset):
    """where="device": uint8 records as stored, each with the (matrix, jitter) the host
    stream draws from (seed, epoch, position); applying them gives the host stream's images."""
    import jax.numpy as jnp

    from leopard_jax.data import device_augment

    path, rows = dataset
    kw = dict(global_batch=8, seed=5, epoch=2, num_devices=1, normalize=False)
    device = next(iter(pipeline.train_loader(rows, path, augment_config={"where": "device"}, **kw)))
    host = next(iter(pipeline.train_loader(rows, path, augment_config={"where": "host"}, **kw)))
    table = pipeline.train_table(rows, global_batch=8, seed=5, epoch=2, num_devices=1)
    source = records.RecordSource(path, rows)
    assert device["image"].dtype == np.uint8 and device["matrix"].shape == (8, 2, 3)
    for slot in range(8):
        np.testing.assert_array_equal(device["image"][slot], source[table[0, slot]])
        matrix, factors = augment.draw(
            np.random.default_rng([5, 2, slot]), H, W, augment.AugmentConfig()
        )
        np.testing.assert_array_equal(device["matrix"][slot], matrix.astype(np.float32))
        np.testing.assert_array_equal(device["jitter"][slot], factors.astype(np.float32))
    np.testing.assert_array_equal(device["label"], host["label"])
    applied = np.asarray(
        device_augment.augment_batch(
            jnp.asarray(device["image"]),
            jnp.asarray(device["matrix"]),
            jnp.asarray(device["jitter"]),
        )
    )
    assert np.abs(applied - host["image"])[:, 2:-2, 2:-2].mean() < 1.0
    with pytest.raises(ValueError, match="normalize=False"):
        pipeline.train_loader(
            rows, path, augment_config={"where": "device"}, **{**kw, "normalize": True}
        )


def test_a_stream_started_mid_epoch_is_the_tail_of_the_whole_stream(dataset):
    """How a run resumes: (epoch, start_step) gives exactly the batches after start_step."""
    path, rows = dataset
    kw = dict(global_batch=8, seed=1, epoch=3, num_epochs=2, num_devices=2, normalize=False)
    whole = pipeline.train_loader(rows, path, **kw)
    tail = pipeline.train_loader(rows, path, start_step=2, **kw)
    assert len(tail) == len(whole) - 2 and tail.steps_per_epoch == whole.steps_per_epoch
    for a, b in zip(_batches(whole)[2:], _batches(tail), strict=True):
        for key in a:
            np.testing.assert_array_equal(a[key], b[key])
    with pytest.raises(ValueError, match="past the epoch"):
        pipeline.train_loader(rows, path, start_step=whole.steps_per_epoch, **kw)


_STOP_MID_STREAM = """
import sys
from leopard_jax.data import pipeline, records
path = sys.argv[1]
rows = records.read_manifest(path)
data = pipeline.train_loader(rows, path, global_batch=8, seed=0, epoch=0, num_epochs=3,
                             num_devices=1, worker_count=2, normalize=False)
next(iter(data))
data.close()
print("closed")
"""


def test_a_stream_stopped_mid_epoch_leaks_no_shared_memory(dataset):
    """Workers started, one batch taken, the stream closed: Python's resource tracker
    reports no leaked shared_memory objects at exit."""
    import subprocess
    import sys

    path, _ = dataset
    proc = subprocess.run(
        [sys.executable, "-c", _STOP_MID_STREAM, str(path)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0 and "closed" in proc.stdout, proc.stderr[-3000:]
    assert "leaked shared_memory" not in proc.stderr, proc.stderr[-3000:]
