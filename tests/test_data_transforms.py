"""Transforms and collate: boxes follow resize and flip exactly; padding; flip draws are pure."""
import pytest
import torch

from distill.data import IMAGENET_MEAN, IMAGENET_STD, DetectionTransform, Sample, boxes_to_original, collate
from distill.data.transforms import flip_draw, hflip_boxes, resized_shape
from distill.errors import ConfigError
from distill.structures import Target


def test_resized_shape_longer_side():
    # 100x200 (h, w) to 160: scale 160 / 200 = 0.8 -> (80, 160)
    assert resized_shape(100, 200, 160) == (0.8, 80, 160)
    # 300x200 to 150: scale 150 / 300 = 0.5 -> (150, 100)
    assert resized_shape(300, 200, 150) == (0.5, 150, 100)


# Boxes and pixels here are elementwise ops on small dyadic / integer values (a scale of 0.8, a mean and a
# std): exact or within a couple of fp32 roundings, ≪ assert_close's fp32 default (rtol 1.3e-6, atol 1e-5).


def test_resize_then_flip_boxes_hand_computed_and_round_trip():
    image = torch.zeros(3, 100, 200, dtype=torch.uint8)
    boxes = torch.tensor([[10.0, 20.0, 50.0, 60.0], [0.0, 0.0, 200.0, 100.0]])
    out, moved, scale = DetectionTransform(160)(image, boxes, flip=True)
    assert out.shape == (3, 80, 160) and scale == pytest.approx(0.8)
    # scale 0.8: [8, 16, 40, 48] and [0, 0, 160, 80]; flip in the resized width 160:
    # x1' = 160 - 40 = 120, x2' = 160 - 8 = 152; the full box stays [0, 0, 160, 80]
    expected = torch.tensor([[120.0, 16.0, 152.0, 48.0], [0.0, 0.0, 160.0, 80.0]])
    torch.testing.assert_close(moved, expected)
    # unflip with the resized width, then unscale, gives back the original boxes
    torch.testing.assert_close(boxes_to_original(moved, scale, True, 160), boxes)
    _, plain, _ = DetectionTransform(160)(image, boxes, flip=False)
    torch.testing.assert_close(plain, torch.tensor([[8.0, 16.0, 40.0, 48.0], [0.0, 0.0, 160.0, 80.0]]))
    torch.testing.assert_close(boxes_to_original(plain, scale, False, 160), boxes)


def test_hflip_is_its_own_inverse():
    boxes = torch.tensor([[1.0, 2.0, 7.0, 9.0]])
    assert hflip_boxes(boxes, 10).tolist() == [[3.0, 2.0, 9.0, 9.0]]  # 10 - 7, 10 - 1
    torch.testing.assert_close(hflip_boxes(hflip_boxes(boxes, 10), 10), boxes)


def test_flipped_pixels_lie_inside_flipped_box():
    # 40x80 image at its own size (scale 1), a white block in rows 5..14, cols 10..29
    image = torch.zeros(3, 40, 80, dtype=torch.uint8)
    image[:, 5:15, 10:30] = 255
    out, boxes, scale = DetectionTransform(80)(image, torch.tensor([[10.0, 5.0, 30.0, 15.0]]), flip=True)
    assert scale == 1.0
    assert boxes.tolist() == [[50.0, 5.0, 70.0, 15.0]]  # x1' = 80 - 30, x2' = 80 - 10
    white = (1.0 - IMAGENET_MEAN[0]) / IMAGENET_STD[0]
    black = (0.0 - IMAGENET_MEAN[0]) / IMAGENET_STD[0]
    inside = torch.zeros(40, 80, dtype=torch.bool)
    inside[5:15, 50:70] = True
    torch.testing.assert_close(out[0][inside], torch.full((200,), white))
    torch.testing.assert_close(out[0][~inside], torch.full((3200 - 200,), black))


def test_boxes_clamped_when_rounding_shrinks_the_image():
    # 29x70 to 160: scale 160 / 70 = 2.2857, height round(66.29) = 66; y2 = 29 * 2.2857 = 66.29 -> 66
    image = torch.zeros(3, 29, 70, dtype=torch.uint8)
    boxes = torch.tensor([[0.0, 0.0, 70.0, 29.0]])
    out, boxes, scale = DetectionTransform(160)(image, boxes, flip=False)
    assert out.shape == (3, 66, 160)
    torch.testing.assert_close(boxes, torch.tensor([[0.0, 0.0, 160.0, 66.0]]))


def test_empty_boxes_pass_through():
    image = torch.zeros(3, 16, 16, dtype=torch.uint8)
    _, boxes, _ = DetectionTransform(32)(image, torch.zeros(0, 4), True)
    assert boxes.shape == (0, 4)


def test_flip_draws_are_pure_and_balanced():
    t = DetectionTransform(32, hflip_prob=0.5)
    first = [t.should_flip(7, 3, i) for i in range(1000)]
    assert first == [t.should_flip(7, 3, i) for i in range(1000)]  # same (seed, epoch, i) -> same flip
    assert first != [t.should_flip(7, 4, i) for i in range(1000)]
    assert first != [t.should_flip(8, 3, i) for i in range(1000)]
    assert 400 < sum(first) < 600
    assert all(0.0 <= flip_draw(0, 0, i) < 1.0 for i in range(100))
    assert not any(DetectionTransform(32, hflip_prob=0.0).should_flip(0, 0, i) for i in range(100))
    assert all(DetectionTransform(32, hflip_prob=1.0).should_flip(0, 0, i) for i in range(100))


@pytest.mark.parametrize("kwargs", [
    {"size": 0}, {"size": 32, "hflip_prob": 1.5}, {"size": 32, "std": (1, 0, 1)},
])
def test_invalid_transform_config(kwargs):
    with pytest.raises(ConfigError):
        DetectionTransform(**kwargs)


def _sample(h: int, w: int, value: float, image_id: int) -> Sample:
    target = Target(boxes=torch.tensor([[0.0, 0.0, w, h]]), labels=torch.tensor([1]))
    return Sample(image=torch.full((3, h, w), value), target=target, image_id=image_id, scale=0.5,
                  flipped=True)


def test_collate_pads_bottom_right_to_divisor():
    batch = collate([_sample(50, 70, 1.0, 11), _sample(64, 33, 2.0, 12)], size_divisor=32)
    # max h 64 -> 64, max w 70 -> 96 (next multiple of 32)
    assert batch.images.shape == (2, 3, 64, 96)
    assert batch.image_sizes.tolist() == [[50, 70], [64, 33]]
    assert batch.image_sizes.dtype == torch.int64
    assert batch.image_ids == [11, 12]
    assert batch.scales.tolist() == [0.5, 0.5] and batch.flipped.tolist() == [True, True]
    assert (batch.images[0, :, :50, :70] == 1.0).all() and batch.images[0, :, 50:].abs().sum() == 0
    assert batch.images[0, :, :, 70:].abs().sum() == 0
    assert (batch.images[1, :, :, :33] == 2.0).all() and batch.images[1, :, :, 33:].abs().sum() == 0
    assert len(batch) == 2 and batch.targets[1].boxes.tolist() == [[0.0, 0.0, 33.0, 64.0]]


def test_collate_exact_multiple_is_not_padded():
    assert collate([_sample(32, 64, 1.0, 1)]).images.shape == (1, 3, 32, 64)
