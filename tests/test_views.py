"""Views: deterministic from (seed, key, view id), exact on the pixel grid, replayable at any size."""
import math
import multiprocessing as mp

import numpy as np
import pytest
import torch

from pipeline.data.views import ViewPolicy, box_to_pixels, render_view, sample_views


def _views_for(keys, policy_dict, size):
    policy = ViewPolicy.from_dict(policy_dict)
    return [sample_views(policy, key, *size) for key in keys]


def test_views_are_deterministic_and_depend_on_seed_key_and_view():
    policy = ViewPolicy(num_views=6)
    boxes, flips = sample_views(policy, "cls/img001", 200, 150)
    again_boxes, again_flips = sample_views(policy, "cls/img001", 200, 150)
    assert np.array_equal(boxes, again_boxes) and np.array_equal(flips, again_flips)
    assert len({tuple(b) for b in boxes}) == 6  # each view id draws its own crop
    other_key, _ = sample_views(policy, "cls/img002", 200, 150)
    other_seed, _ = sample_views(ViewPolicy(num_views=6, seed=1), "cls/img001", 200, 150)
    assert not np.array_equal(boxes, other_key)
    assert not np.array_equal(boxes, other_seed)
    # A view does not depend on how many views are drawn: view 2 of 3 is view 2 of 6.
    fewer, _ = sample_views(ViewPolicy(num_views=3), "cls/img001", 200, 150)
    assert np.array_equal(fewer, boxes[:3])


def test_views_are_identical_in_another_process():
    keys = [f"k/{i}" for i in range(20)]
    policy = ViewPolicy(num_views=4, seed=7)
    with mp.get_context("spawn").Pool(1) as pool:
        remote = pool.apply(_views_for, (keys, policy.to_dict(), (97, 61)))
    local = _views_for(keys, policy.to_dict(), (97, 61))
    for (rb, rf), (lb, lf) in zip(remote, local):
        assert np.array_equal(rb, lb) and np.array_equal(rf, lf)


@pytest.mark.parametrize("size", [(224, 224), (500, 375), (33, 97), (1, 1)])
def test_boxes_respect_the_policy_and_map_back_to_exact_pixels(size):
    width, height = size
    policy = ViewPolicy(num_views=8, scale=(0.25, 0.6), ratio=(0.5, 2.0))
    for i in range(50):
        boxes, _ = sample_views(policy, f"key{i}", width, height)
        assert boxes.dtype == np.float32
        assert (boxes >= 0).all() and (boxes <= 1).all()
        assert (boxes[:, 2] > boxes[:, 0]).all() and (boxes[:, 3] > boxes[:, 1]).all()
        for box in boxes:
            top, left, h, w = box_to_pixels(box, width, height)
            assert 0 <= left and left + w <= width and 0 <= top and top + h <= height
            # float32 storage still lands on the integer grid the crop was drawn on
            assert np.allclose(box * [width, height, width, height],
                               [left, top, left + w, top + h], atol=1e-3)
            if min(width, height) >= 97:  # large images: the sampled crop is always accepted
                area = w * h / (width * height)
                assert 0.25 - 0.03 <= area <= 0.6 + 0.03
                assert 0.5 - 0.05 <= w / h <= 2.0 + 0.05


def test_flip_probability_and_centre_view():
    policy = ViewPolicy(num_views=4, flip_prob=0.5, center_view=True)
    flips = np.array([sample_views(policy, f"s{i}", 64, 48)[1] for i in range(1000)])
    assert not flips[:, 0].any()  # the centre view is never flipped
    assert 0.45 < flips[:, 1:].mean() < 0.55
    boxes, _ = sample_views(policy, "s0", 64, 48)
    top, left, h, w = box_to_pixels(boxes[0], 64, 48)
    assert (h, w) == (42, 42) and (top, left) == (3, 11)  # 0.875 * 48 = 42, centred
    never = ViewPolicy(num_views=3, flip_prob=0.0)
    assert not any(sample_views(never, f"s{i}", 64, 48)[1].any() for i in range(100))


def test_render_view_crops_flips_and_resizes():
    image = torch.arange(3 * 8 * 12, dtype=torch.int32).reshape(3, 8, 12).to(torch.uint8)
    full = np.array([0, 0, 1, 1], np.float32)
    assert torch.equal(render_view(image, full, False, (8, 12)), image)
    assert torch.equal(render_view(image, full, True, (8, 12)), image.flip(-1))
    left_half = np.array([0, 0, 0.5, 1], np.float32)
    assert torch.equal(render_view(image, left_half, False, (8, 6)), image[:, :, :6])
    bottom_right = np.array([0.75, 0.5, 1, 1], np.float32)
    assert torch.equal(render_view(image, bottom_right, False, (4, 3), "nearest"), image[:, 4:, 9:])
    resized = render_view(image, left_half, False, (16, 12), "bicubic")
    assert resized.shape == (3, 16, 12) and resized.dtype == torch.uint8


def test_policy_rejects_bad_parameters():
    with pytest.raises(ValueError, match="num_views"):
        ViewPolicy(num_views=0)
    with pytest.raises(ValueError, match="scale"):
        ViewPolicy(num_views=1, scale=(0.5, 0.2))
    with pytest.raises(ValueError, match="flip_prob"):
        ViewPolicy(num_views=1, flip_prob=1.5)
    policy = ViewPolicy(num_views=2, scale=(0.1, 0.9), ratio=(0.5, 2), center_view=True, seed=3)
    assert ViewPolicy.from_dict(policy.to_dict()) == policy
    assert math.isclose(policy.to_dict()["ratio"][1], 2)
