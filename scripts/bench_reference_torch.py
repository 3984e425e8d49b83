"""The PyTorch reference that `scripts/bench.py` races leopard_jax against.

It is the spotID recipe, written here (nothing downloaded): timm `tf_efficientnetv2_b2`
with a 4-channel stem (random init), a Linear(1000 -> 1024) on the ImageNet-logit output
(spotID puts its embedding head there), L2 normalisation, adaptive-margin CosFace
(s = 64, m = 0.28, margin m·h(cos) on the true class only, h(cos) = ((1 - cos²)^4 + 0.1) / 1.1)
and Adam (lr 1e-3) over the network and the class centres.

Run in PyTorch's fastest plain setting: channels_last, no autograd in `embed`, bf16 through
autocast (fp32 master weights, as the JAX side's `dtype=bfloat16`). The reference data and
preprocessing paths (a torch DataLoader over the same records; cv2 per image) live here too,
so that everything the bench calls "reference" is in one file.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

SCALE = 64.0
MARGIN = 0.28


class SpotIDNet(nn.Module):
    """timm backbone -> 1000 logits -> Linear(1000, dims) -> unit vectors (spotID's head,
    with spotID's parameter names, so its state dict imports as a spotID checkpoint)."""

    def __init__(self, backbone: str = "tf_efficientnetv2_b2", dims: int = 1024, in_chans: int = 4):
        super().__init__()
        import timm

        self.backbone_name = backbone
        self.backbone = timm.create_model(
            backbone, pretrained=False, in_chans=in_chans, num_classes=1000
        )
        self.embedding_layer = nn.Linear(1000, dims)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.embedding_layer(self.backbone(x)).float(), dim=-1)


def adaptive_margin(cos: torch.Tensor) -> torch.Tensor:
    """h(cos) = ((1 - cos²)^4 + 0.1) / 1.1: largest penalty for orthogonal (hard) samples."""
    return ((1.0 - cos * cos) ** 4 + 0.1) / 1.1


def cosface_loss(
    embeddings: torch.Tensor,
    centers: torch.Tensor,
    labels: torch.Tensor,
    *,
    scale: float = SCALE,
    margin: float = MARGIN,
    adaptive: bool = True,
) -> torch.Tensor:
    """Mean CosFace loss over rows with label >= 0 (label -1 = padding), fp32 throughout."""
    cos = F.normalize(embeddings.float(), dim=-1) @ F.normalize(centers.float(), dim=-1).T
    valid = labels >= 0
    safe = labels.clamp(min=0)
    true_cos = cos.gather(1, safe[:, None])[:, 0]
    penalty = margin * (adaptive_margin(true_cos) if adaptive else torch.ones_like(true_cos))
    logits = scale * (cos - F.one_hot(safe, cos.shape[1]).to(cos.dtype) * penalty[:, None])
    per_row = F.cross_entropy(logits, safe, reduction="none")
    return (per_row * valid).sum() / valid.sum().clamp(min=1)


def init_centers(num_classes: int, dims: int, seed: int = 0) -> np.ndarray:
    """Random class centres, shared by both sides (same numbers, so the same first loss)."""
    rng = np.random.default_rng(seed)
    return rng.standard_normal((num_classes, dims)).astype(np.float32) / math.sqrt(dims)


def to_device_images(images_nhwc: np.ndarray, device: torch.device) -> torch.Tensor:
    """NHWC numpy -> NCHW tensor in channels_last memory (a free view of NHWC data)."""
    x = torch.from_numpy(np.ascontiguousarray(images_nhwc)).permute(0, 3, 1, 2)
    return x.to(device).contiguous(memory_format=torch.channels_last)


def normalized_device_images(images_nhwc: np.ndarray, device: torch.device) -> torch.Tensor:
    """uint8 NHWC numpy -> (x/255 - mean) / std float32 NCHW on `device`, channels_last: the
    uint8 crosses to the device and is normalised there, as leopard_jax's embed path does
    (with the same constants, `leopard_jax.data.augment.MEAN/STD`)."""
    from leopard_jax.data import augment

    x = to_device_images(images_nhwc, device).float()
    mean = torch.as_tensor(augment.MEAN, device=device).view(1, -1, 1, 1)
    std = torch.as_tensor(augment.STD, device=device).view(1, -1, 1, 1)
    return ((x / 255.0 - mean) / std).contiguous(memory_format=torch.channels_last)


def autocast(device: torch.device, dtype: torch.dtype):
    if dtype == torch.float32:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)


def make_train_step(
    model: SpotIDNet,
    centers: torch.Tensor,
    *,
    lr: float = 1e-3,
    dtype: torch.dtype = torch.float32,
    loss_fn: Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor] = cosface_loss,
) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
    """One Adam step over (model, centres); returns the loss *before* the update."""
    device = centers.device
    centers.requires_grad_(True)
    optimizer = torch.optim.Adam([*model.parameters(), centers], lr=lr)
    model.train()

    def step(images: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        optimizer.zero_grad(set_to_none=True)
        with autocast(device, dtype):
            embeddings = model(images)
        loss = loss_fn(embeddings, centers, labels)
        loss.backward()
        optimizer.step()
        return loss.detach()

    return step


def make_embed(
    model: SpotIDNet, *, dtype: torch.dtype = torch.float32
) -> Callable[[torch.Tensor], torch.Tensor]:
    """Inference embeddings (BN running stats, no autograd)."""
    device = next(model.parameters()).device

    def embed(images: torch.Tensor) -> torch.Tensor:
        model.eval()
        with torch.inference_mode(), autocast(device, dtype):
            return model(images)

    return embed


def build(
    *,
    backbone: str = "tf_efficientnetv2_b2",
    dims: int = 1024,
    in_chans: int = 4,
    device: str = "cpu",
    seed: int = 0,
) -> SpotIDNet:
    """A randomly initialised SpotIDNet in channels_last on `device`."""
    torch.manual_seed(seed)
    model = SpotIDNet(backbone, dims, in_chans)
    return model.to(torch.device(device), memory_format=torch.channels_last)


# ---------------------------------------------------------------- data reference
# A plain torch DataLoader over the same records, in the same epoch order, doing the same
# per-image work (leopard_jax's public augment + normalise, so that the two loaders differ
# only in their machinery: grain's workers/threads against torch's worker processes).


class RecordDataset(torch.utils.data.Dataset):
    """Element i of an epoch table: read record table[i], augment, normalise (as one item)."""

    def __init__(self, source, table: np.ndarray, labels: np.ndarray, *, seed: int, epoch: int):
        self.source, self.table, self.labels = source, table, labels
        self.seed, self.epoch = seed, epoch

    def __len__(self) -> int:
        return len(self.table)

    def __getitem__(self, i: int):
        from leopard_jax.data import augment

        index = int(self.table[i])
        if index < 0:  # padding slot of the epoch table
            return {"image": torch.zeros(self.source.shape, dtype=torch.float32), "label": -1}
        image = self.source[index]
        rng = np.random.default_rng([self.seed, self.epoch, i])
        image = augment.normalize(augment.augment(image, rng, augment.AugmentConfig()))
        return {"image": torch.from_numpy(image), "label": int(self.labels[index])}


def make_loader(dataset: RecordDataset, batch: int, workers: int) -> torch.utils.data.DataLoader:
    """In table order (the table is already the shuffled epoch), batches of `batch`.

    Workers are spawned, not forked: the bench process runs JAX's threads, and forking a
    multithreaded process can deadlock."""
    return torch.utils.data.DataLoader(
        dataset,
        batch_size=batch,
        shuffle=False,
        num_workers=workers,
        multiprocessing_context="spawn" if workers > 0 else None,
    )


# ---------------------------------------------------------------- preprocessing reference
# spotID's per-image steps in plain cv2 (its edge step: grey -> 5x5 blur -> Canny(55, 160)).


def edges_cv2(rgb: np.ndarray) -> np.ndarray:
    import cv2

    grey = cv2.cvtColor(rgb, cv2.COLOR_RGB2GRAY)
    return cv2.Canny(cv2.GaussianBlur(grey, (5, 5), 0), 55, 160)


def render_cv2(rgb: np.ndarray, edge: np.ndarray, height: int, width: int) -> np.ndarray:
    import cv2

    size = (width, height)
    rgb = cv2.resize(rgb, size, interpolation=cv2.INTER_AREA)
    edge = cv2.resize(edge, size, interpolation=cv2.INTER_AREA)
    return np.concatenate([rgb, edge[..., None]], axis=-1)
