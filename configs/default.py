"""The paper's best setting: EfficientNetV2-B2, RGB+edge input 256×512, 1024-d embedding,
adaptive-margin CosFace (s=64, m=0.28), batch 64 of 4 images per individual, Adam 1e-3
with ×0.7 every 5 epochs, 80 epochs, best model by held-out DT5AP.

python -m leopard_jax.train --config configs/default.py --workdir W --config.data_dir=DATASET
"""

import ml_collections


def get_config() -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()
    c.data_dir = ""  # a dataset made by `python -m leopard_jax.preprocess`; required
    c.seed = 0
    c.num_epochs = 80
    c.batch_size = 64  # global, over all devices and processes
    c.images_per_identity = 4
    c.keep_singletons = False  # CosFace drops individuals with one image; triplet keeps them
    # Which records train (and are held out): only these viewpoints ("left,right"; empty =
    # all), and only individuals with at least this many training images (0 = no minimum).
    c.flanks = ""
    c.min_images_per_identity = 0
    c.workers = 2  # grain worker processes per host

    # Held-out individuals: taken from DATASET/split.json when it exists, otherwise split
    # here by individual with this fraction and seed (and written to the workdir).
    c.split = ml_collections.ConfigDict(dict(test_fraction=0.2, seed=0))

    c.augment = ml_collections.ConfigDict(
        dict(
            rotate_deg=10.0,  # ± uniform
            crop_fraction=0.1,  # up to this much of each side, then resized back
            brightness=0.2,  # colour jitter on RGB only: "slight", as in the paper
            contrast=0.2,
            saturation=0.2,
            # where it runs: "host" (OpenCV in the grain workers), "device" (JAX, inside the
            # jitted step), "auto": device on GPU/TPU, host on CPU (same cores either way)
            where="auto",
        )
    )

    c.model = ml_collections.ConfigDict(
        dict(
            backbone="efficientnetv2_b2",
            head="pooled",  # "spotid": embedding on the 1000 ImageNet logits, as the original code
            dims=1024,
            drop_path_rate=0.2,
            dtype="float32",  # "bfloat16": bf16 compute, fp32 parameters
        )
    )

    # Where the weights start: "random", "timm" (a local timm state dict; stem widened to 4
    # channels) or "spotid" (a local spotID checkpoint, .pth).
    c.init = ml_collections.ConfigDict(dict(kind="random", path=""))

    c.loss = ml_collections.ConfigDict(
        dict(
            name="cosface",  # a key of losses.LOSSES: cosface, arcface, triplet
            scale=64.0,
            margin=0.28,
            # adaptive: m·h(θ), h = ((1 − cos²θ)⁴ + 0.1)/1.1; constant: h = 1; spotid_code:
            # what the released spotID code computes (any name in losses.MARGIN_FUNCTIONS)
            margin_fn="adaptive",
            train_centers=True,  # False reproduces the original code's frozen class centres
            triplet_margin=0.2,
            triplet_warmup_epochs=3,  # random negatives before semi-hard mining starts
        )
    )

    c.optim = ml_collections.ConfigDict(
        dict(
            learning_rate=1e-3,
            decay_every_epochs=5,  # step decay, written in steps from the epoch length
            decay_factor=0.7,
            weight_decay=0.0,
            grad_clip_norm=0.0,  # 0 = off
        )
    )

    # Held-out evaluation: every `every_epochs` epochs (and after the last), `batch_size`
    # images per device at a time, TkRMD up to k_max. The held-out images stay on the devices
    # (sent once) when they take at most `cache_mb` MiB per device; 0: read every time.
    c.eval = ml_collections.ConfigDict(
        dict(every_epochs=1, batch_size=64, k_max=10, cache_mb=2048.0)
    )
    c.max_bad_steps = 5  # consecutive non-finite steps before the run stops

    # Multi-host: jax.distributed.initialize() (arguments from the environment on TPU/SLURM,
    # or these when set).
    c.distributed = False
    c.coordinator_address = ""
    c.num_processes = 0
    c.process_id = -1
    return c
