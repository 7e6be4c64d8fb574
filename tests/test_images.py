"""Image decoding and view rendering: the fast paths give exactly the pixels of the reference paths."""
import io

import numpy as np
import pytest
import torch
from PIL import Image
from torchvision.transforms.v2 import functional as TF

from pipeline.data.images import decode_sample, decode_tensor, jpeg_size
from pipeline.data.shards import ImageDecodeError, RawSample, decode_image
from pipeline.data.views import (ViewPolicy, box_to_pixels, interpolation_mode, render_view, sample_views,
                                 stack_views)


def _photo_like(width=96, height=72, seed=0):
    """Smooth gradients plus noise: JPEG blocks with real content, unlike flat colour."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width]
    base = np.stack([x * 255 / width, y * 255 / height, (x + y) * 127 / (width + height)], -1)
    return np.clip(base + rng.normal(0, 20, base.shape), 0, 255).astype(np.uint8)


def _encode(pixels, mode="RGB", **options):
    buffer = io.BytesIO()
    Image.fromarray(pixels).convert(mode).save(buffer, format=options.pop("format", "JPEG"), **options)
    return buffer.getvalue()


@pytest.mark.parametrize("mode, options", [("RGB", {}), ("RGB", {"progressive": True}), ("L", {}), ("CMYK", {}),
                                           ("RGB", {"format": "PNG"}), ("RGBA", {"format": "PNG"})])
def test_decoded_pixels_equal_pil(mode, options):
    data = _encode(_photo_like(), mode, **options)
    image = decode_tensor(data)
    assert image.dtype == torch.uint8 and image.shape == (3, 72, 96)
    assert np.array_equal(image.permute(1, 2, 0).numpy(), decode_image(data))


def test_jpeg_size_reads_the_frame_header():
    data = _encode(_photo_like(width=50, height=30), quality=90)
    assert jpeg_size(data) == (50, 30)
    assert jpeg_size(_encode(_photo_like(), format="PNG")) is None
    assert jpeg_size(data[:10]) is None


def test_truncated_and_missing_images_raise_decode_errors():
    data = _encode(_photo_like())
    with pytest.raises(ImageDecodeError):
        decode_tensor(data[: len(data) // 2])
    with pytest.raises(ImageDecodeError, match="no image member"):
        decode_sample(RawSample(key="k", label=0, image_bytes=None, image_ext=None))


def test_decompression_bomb_is_refused_from_the_header(monkeypatch):
    data = bytearray(_encode(_photo_like()))
    sof = next(i for i in range(2, len(data) - 1) if data[i] == 0xFF and data[i + 1] in (0xC0, 0xC2))
    data[sof + 5:sof + 9] = (40000).to_bytes(2, "big") + (50000).to_bytes(2, "big")  # height, width
    with pytest.raises(ImageDecodeError, match="decompression bomb.*50000x40000"):
        decode_tensor(bytes(data))


def _reference_render(image, box, flip, size, interpolation):
    """The plain torchvision crop-and-resize on a planar tensor."""
    height, width = image.shape[-2:]
    top, left, h, w = box_to_pixels(box, width, height)
    view = TF.resized_crop(image.contiguous(), top, left, h, w, list(size),
                           interpolation=interpolation_mode(interpolation), antialias=True)
    return view.flip(-1) if flip else view


@pytest.mark.parametrize("interpolation", ["bilinear", "bicubic", "nearest"])
def test_rendered_views_equal_the_plain_torchvision_crop(interpolation):
    image = decode_tensor(_encode(_photo_like(width=120, height=90), quality=90))
    boxes, flips = sample_views(ViewPolicy(num_views=6, seed=3), "key", 120, 90)
    for box, flip in zip(boxes, flips):
        for size in [(64, 64), (48, 80), (200, 200)]:  # down- and upscaling
            fast = render_view(image, box, bool(flip), size, interpolation)
            assert torch.equal(fast, _reference_render(image, box, bool(flip), size, interpolation))


def test_stacked_views_are_a_channels_last_batch_of_the_same_pixels():
    image = decode_tensor(_encode(_photo_like()))
    views = [render_view(image, np.array([0.1, 0.2, 0.9, 0.8], np.float32), flip, (32, 40)) for flip in (False, True)]
    batch = stack_views(views)
    assert batch.shape == (2, 3, 32, 40) and batch.is_contiguous(memory_format=torch.channels_last)
    assert torch.equal(batch, torch.stack(views))
