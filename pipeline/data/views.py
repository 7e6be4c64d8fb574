"""Augmented views: sampled once from (store seed, sample key, view id), replayed anywhere.

A view is a crop box, normalised to the decoded image as ``(x0, y0, x1, y1)`` in
[0, 1], plus a horizontal-flip flag. Boxes follow torchvision's RandomResizedCrop
sampling on the image's own pixel grid, so a box maps back to exact pixel bounds,
and being resolution-free, one box serves every teacher's input size and any
student resolution. The random numbers come from Philox, a counter-based generator
keyed by a hash of (seed, key, view id): any worker, in any order, on any machine,
produces the same views.
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import asdict, dataclass

import numpy as np
import torch
from torchvision.transforms import InterpolationMode
from torchvision.transforms.v2 import functional as TF


@dataclass(frozen=True)
class ViewPolicy:
    """How the V views of every sample are drawn (stored in the cache's attrs)."""

    num_views: int
    scale: tuple[float, float] = (0.08, 1.0)  # RandomResizedCrop area fraction
    ratio: tuple[float, float] = (3 / 4, 4 / 3)  # RandomResizedCrop aspect ratio
    flip_prob: float = 0.5
    center_view: bool = False  # view 0 is the centre crop (no flip) used for evaluation
    center_crop_fraction: float = 0.875  # side of the centre crop / shorter image side
    seed: int = 0

    def __post_init__(self) -> None:
        if self.num_views < 1:
            raise ValueError(f"num_views must be >= 1, got {self.num_views}")
        if not 0 < self.scale[0] <= self.scale[1] <= 1:
            raise ValueError(f"scale must satisfy 0 < min <= max <= 1, got {self.scale}")
        if not 0 < self.ratio[0] <= self.ratio[1]:
            raise ValueError(f"ratio must satisfy 0 < min <= max, got {self.ratio}")
        if not 0 <= self.flip_prob <= 1:
            raise ValueError(f"flip_prob must be in [0, 1], got {self.flip_prob}")

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> ViewPolicy:
        d = dict(d)
        d["scale"], d["ratio"] = tuple(d["scale"]), tuple(d["ratio"])
        return cls(**d)


def _view_rng(seed: int, key: str, view: int) -> np.random.Generator:
    digest = hashlib.sha256(f"{seed}\x00{key}\x00{view}".encode()).digest()
    return np.random.Generator(np.random.Philox(key=int.from_bytes(digest[:16], "little")))


def _random_resized_crop(rng: np.random.Generator, width: int, height: int,
                         scale: tuple[float, float], ratio: tuple[float, float]) -> tuple[int, int, int, int]:
    """torchvision's RandomResizedCrop.get_params on a given generator: (top, left, h, w)."""
    area = width * height
    log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
    for _ in range(10):
        target_area = area * rng.uniform(scale[0], scale[1])
        aspect = math.exp(rng.uniform(log_ratio[0], log_ratio[1]))
        w = int(round(math.sqrt(target_area * aspect)))
        h = int(round(math.sqrt(target_area / aspect)))
        if 0 < w <= width and 0 < h <= height:
            top = int(rng.integers(0, height - h + 1))
            left = int(rng.integers(0, width - w + 1))
            return top, left, h, w
    # Fallback: the largest centred crop whose aspect ratio is within range.
    in_ratio = width / height
    if in_ratio < ratio[0]:
        w, h = width, int(round(width / ratio[0]))
    elif in_ratio > ratio[1]:
        w, h = int(round(height * ratio[1])), height
    else:
        w, h = width, height
    return (height - h) // 2, (width - w) // 2, h, w


def _center_crop(width: int, height: int, fraction: float) -> tuple[int, int, int, int]:
    side = max(1, int(round(min(width, height) * fraction)))
    return (height - side) // 2, (width - side) // 2, side, side


def _box(top: int, left: int, h: int, w: int, width: int, height: int) -> np.ndarray:
    return np.array([left / width, top / height, (left + w) / width, (top + h) / height], np.float32)


def policy_view(policy: ViewPolicy, key: str, view: int, width: int, height: int) -> tuple[np.ndarray, bool]:
    """View ``view`` of a sample: its box float32 [4] and flip, drawn without drawing the views before it."""
    if view == 0 and policy.center_view:
        return _box(*_center_crop(width, height, policy.center_crop_fraction), width, height), False
    rng = _view_rng(policy.seed, key, view)
    top, left, h, w = _random_resized_crop(rng, width, height, policy.scale, policy.ratio)
    return _box(top, left, h, w, width, height), bool(rng.random() < policy.flip_prob)


def sample_views(policy: ViewPolicy, key: str, width: int, height: int) -> tuple[np.ndarray, np.ndarray]:
    """Return the views of one sample: boxes float32 [V, 4] and flips bool [V]."""
    views = [policy_view(policy, key, view, width, height) for view in range(policy.num_views)]
    return np.stack([box for box, _ in views]), np.array([flip for _, flip in views], dtype=bool)


def center_box(width: int, height: int, size: tuple[int, int], crop_pct: float) -> np.ndarray:
    """timm's eval crop as a box: the centred region of ``size``'s aspect, crop_pct of the shorter fit."""
    scale = crop_pct * min(width / size[1], height / size[0])
    w = min(width, max(1, round(size[1] * scale)))
    h = min(height, max(1, round(size[0] * scale)))
    return _box((height - h) // 2, (width - w) // 2, h, w, width, height)


def box_to_pixels(box: np.ndarray, width: int, height: int) -> tuple[int, int, int, int]:
    """Exact pixel bounds (top, left, h, w) of a normalised box on a width x height image."""
    x0, y0 = int(round(float(box[0]) * width)), int(round(float(box[1]) * height))
    x1, y1 = int(round(float(box[2]) * width)), int(round(float(box[3]) * height))
    return y0, x0, max(1, y1 - y0), max(1, x1 - x0)


_INTERPOLATION = {
    "nearest": InterpolationMode.NEAREST_EXACT,
    "bilinear": InterpolationMode.BILINEAR,
    "bicubic": InterpolationMode.BICUBIC,
    # Tensor resizing has no lanczos/box/hamming; bicubic is the closest antialiased filter.
    "lanczos": InterpolationMode.BICUBIC,
    "box": InterpolationMode.BILINEAR,
    "hamming": InterpolationMode.BILINEAR,
}


def interpolation_mode(name: str) -> InterpolationMode:
    try:
        return _INTERPOLATION[name]
    except KeyError:
        raise ValueError(f"unknown interpolation {name!r}; known: {sorted(_INTERPOLATION)}") from None


def render_view(image: torch.Tensor, box: np.ndarray, flip: bool, size: tuple[int, int],
                interpolation: str = "bilinear") -> torch.Tensor:
    """Crop one view out of a uint8 [3, H, W] image and resize it to ``size`` (H, W), as uint8.

    Teachers (when caching) and students (when training) both call this, so a
    replayed view is the cached view, at whatever resolution the caller asks for.
    """
    height, width = image.shape[-2:]
    top, left, h, w = box_to_pixels(box, width, height)
    # Packing the crop pixel-interleaved first puts uint8 resizing on torch's vectorised
    # channels-last kernel, 3-4x faster than a planar crop; the pixels are the same.
    crop = image[None, :, top:top + h, left:left + w].contiguous(memory_format=torch.channels_last)
    view = TF.resize(crop, list(size), interpolation=interpolation_mode(interpolation), antialias=True)[0]
    return view.flip(-1) if flip else view


def stack_views(views: list[torch.Tensor]) -> torch.Tensor:
    """Rendered uint8 [3, H, W] views -> a channels-last uint8 [B, 3, H, W] batch.

    ``render_view`` returns pixel-interleaved views, so stacking them channels-last is a plain
    copy where a planar stack would transpose every pixel.
    """
    return torch.stack([view.permute(1, 2, 0) for view in views]).permute(0, 3, 1, 2)


def normalize(batch: torch.Tensor, mean: tuple[float, ...], std: tuple[float, ...]) -> torch.Tensor:
    """uint8 [B, 3, H, W] -> float32, scaled to [0, 1] then standardised per channel."""
    mean_t = torch.tensor(mean, dtype=torch.float32, device=batch.device).view(1, -1, 1, 1)
    std_t = torch.tensor(std, dtype=torch.float32, device=batch.device).view(1, -1, 1, 1)
    return (batch.float().div_(255.0) - mean_t) / std_t
