"""Decoding sample images to uint8 tensors, the same way for caching, verifying and training.

JPEGs (almost every sample) go through torchvision's libjpeg-turbo decoder, which gives the
same pixels as PIL about 1.45x as fast (bit for bit, for baseline, progressive, grayscale and CMYK files;
``tests/test_images.py``); anything else, and any JPEG torchvision refuses, goes through PIL
(``decode_image``). The result is a [3, H, W] view of pixel-interleaved (HWC) memory, the layout
the fast uint8 resize in ``views.render_view`` wants.
"""

from __future__ import annotations

import warnings

import torch
from PIL import Image
from torchvision.io import ImageReadMode, decode_jpeg

from pipeline.data.shards import ImageDecodeError, RawSample, decode_image

# torchvision 0.29 marks its image codecs deprecated in favour of TorchCodec; constraints.txt pins
# it, and PIL gives the same pixels should the codec ever go.
warnings.filterwarnings("ignore", message="The image decoding and encoding capabilities of TorchVision",
                        category=DeprecationWarning)

_SOF_MARKERS = frozenset(range(0xC0, 0xD0)) - {0xC4, 0xC8, 0xCC}  # start-of-frame; C4/C8/CC are not
_NO_LENGTH_MARKERS = frozenset([0x01, *range(0xD0, 0xDA)])


def jpeg_size(data: bytes) -> tuple[int, int] | None:
    """(width, height) from a JPEG's start-of-frame header, or None if it has none (not a JPEG)."""
    if data[:2] != b"\xff\xd8":
        return None
    i = 2
    while i + 4 <= len(data):
        if data[i] != 0xFF:
            return None
        marker = data[i + 1]
        if marker == 0xFF:  # fill byte
            i += 1
            continue
        if marker in _NO_LENGTH_MARKERS:
            i += 2
            continue
        if marker in _SOF_MARKERS:
            if i + 9 > len(data):
                return None
            height, width = int.from_bytes(data[i + 5:i + 7], "big"), int.from_bytes(data[i + 7:i + 9], "big")
            return width, height
        i += 2 + int.from_bytes(data[i + 2:i + 4], "big")
    return None


def _check_pixels(width: int, height: int) -> None:
    limit = Image.MAX_IMAGE_PIXELS
    if limit and width * height > limit:
        raise ImageDecodeError(f"image refused as a possible decompression bomb: {width}x{height} = "
                               f"{width * height} pixels, above Image.MAX_IMAGE_PIXELS = {limit}")


def decode_tensor(data: bytes) -> torch.Tensor:
    """Decode image bytes to uint8 [3, H, W] (RGB), HWC in memory; raises ImageDecodeError."""
    size = jpeg_size(data)
    if size is not None:
        _check_pixels(*size)
        try:
            return decode_jpeg(torch.frombuffer(bytearray(data), dtype=torch.uint8), mode=ImageReadMode.RGB)
        except RuntimeError:
            pass  # PIL decides, and words the error
    return torch.from_numpy(decode_image(data)).permute(2, 0, 1)


def decode_sample(raw: RawSample) -> torch.Tensor:
    """A sample's image as uint8 [3, H, W]; raises ImageDecodeError (no image member, or undecodable)."""
    if raw.image_bytes is None:
        raise ImageDecodeError("no image member (jpg/jpeg/png/webp)")
    return decode_tensor(raw.image_bytes)


def decode_jpegs_on_device(datas: list[bytes], device: torch.device) -> list[torch.Tensor | None]:
    """Batch-decode JPEGs with nvjpeg on a CUDA ``device``; None where a file must go through the CPU path.

    Written for GPU cache workers; not run in this project's CPU-only tests.
    """
    results: list[torch.Tensor | None] = [None] * len(datas)
    wanted = []
    for i, data in enumerate(datas):
        size = jpeg_size(data)
        limit = Image.MAX_IMAGE_PIXELS
        if size is not None and (not limit or size[0] * size[1] <= limit):  # bombs go to the CPU path's refusal
            wanted.append(i)
    if not wanted:
        return results
    inputs = [torch.frombuffer(bytearray(datas[i]), dtype=torch.uint8) for i in wanted]
    try:
        decoded = decode_jpeg(inputs, mode=ImageReadMode.RGB, device=device)
    except RuntimeError:
        return results  # one bad file fails the batch: the CPU path sorts them out one by one
    for i, image in zip(wanted, decoded):
        results[i] = image
    return results
