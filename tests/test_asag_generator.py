"""ASAG's adaptive sparse anchor generator: shapes, batching, probing, targets, matching, learning."""
import math
import time

import pytest
import torch
from tolerances import FP32_NETWORK, FP64_SAME_MATH

from distill.engine.device import Runtime
from distill.structures import Target
from students.sparse.asag.anchor_generator import AnchorGenerator, PatchPredictions
from students.sparse.asag.generator_ops import SUPPRESSED_LOGIT, gather_windows, place_windows, resample_valid_region
from students.sparse.asag.generator_targets import (
    GeneratorLossWeights,
    generator_loss,
    match_patches,
    patch_targets,
    training_windows,
)
from students.sparse.asag.generator_types import empty_patches

C = 16
SIZES = torch.tensor([[160, 160], [128, 150], [96, 160]])  # (h, w) inside a 160 x 160 canvas


def _features(batch: int = 3, canvas: int = 160, seed: int = 0) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(batch, C, canvas // s, canvas // s, generator=g) for s in (8, 16, 32)]


def _generator(**kwargs) -> AnchorGenerator:
    torch.manual_seed(0)
    gen = AnchorGenerator(C, **kwargs)
    with torch.no_grad():  # small P4 anchors, so that P3 probing is reached too
        gen.mlp_probe[-1].bias.view(-1, 5)[:, 2:4] = -3.0
    return gen.eval()


def _score_bias(gen: AnchorGenerator, value: float) -> None:
    with torch.no_grad():
        gen.mlp_fixed[-1].weight.view(-1, 5, gen.mlp_fixed[-1].in_features)[:, 4] = 0.0
        gen.mlp_fixed[-1].bias.view(-1, 5)[:, 4] = value


def _targets(counts: list[int]) -> list[Target]:
    g = torch.Generator().manual_seed(1)
    out = []
    for n in counts:
        xy = torch.rand(n, 2, generator=g) * 80
        wh = 8 + torch.rand(n, 2, generator=g) * 50
        out.append(Target(torch.cat((xy, xy + wh), 1), torch.zeros(n, dtype=torch.long)))
    return out


def _check_output(out, sizes, gen):
    b, q, _ = out.boxes.shape
    assert out.scores.shape == out.valid.shape == out.source.shape == (b, q)
    counts = out.valid.sum(1)
    assert int(counts.max()) == q
    assert (counts >= gen.min_anchors).all() and (counts <= gen.max_anchors).all()
    for i in range(b):
        n = int(counts[i])
        assert out.valid[i, :n].all() and not out.valid[i, n:].any()  # valid rows first
        h, w = sizes[i].tolist()
        assert torch.equal(out.boxes[i, n:], torch.tensor([[0.0, 0.0, w, h]]).expand(q - n, 4))
        assert (out.scores[i, n:] == SUPPRESSED_LOGIT).all() and (out.source[i, n:] == -1).all()
    assert not out.boxes.requires_grad and not out.scores.requires_grad


@pytest.mark.parametrize("counts", [[0, 0, 0], [1, 0, 1], [12, 3, 7]])
def test_shapes_and_valid_masks_in_training_and_inference(counts):
    gen, feats = _generator(), _features()
    targets = _targets(counts)
    gen.train()
    out = gen(feats, SIZES, targets)
    _check_output(out, SIZES, gen)
    assert out.fixed.logits.shape == (3 * 8, gen.anchors_fixed)  # 4 quadrants + P6 and its 3 flips
    assert out.fixed.boxes.shape == (3 * 8, gen.anchors_fixed, 4)
    assert out.fixed.level.tolist() == ([5] * 4 + [6] * 4) * 3
    assert out.fixed.hflip.view(3, 8)[0].tolist() == [False] * 5 + [True, False, True]
    assert out.fixed.vflip.view(3, 8)[0].tolist() == [False] * 6 + [True, True]
    assert out.probe.level.tolist() == [4] * out.probe_windows[0] + [3] * out.probe_windows[1]
    assert len(out.probe_windows) == 2 and all(n >= 3 * gen.min_train_patches for n in out.probe_windows)
    assert out.probe.logits.shape == (sum(out.probe_windows), gen.anchors_probe)
    losses = gen.loss(out, targets, SIZES)
    assert set(losses) == {"loss_anchor_cls", "loss_anchor_l1", "loss_anchor_giou"}
    assert all(torch.isfinite(v) and v.dim() == 0 for v in losses.values())
    gen.eval()
    with torch.no_grad():
        _check_output(gen(feats, SIZES), SIZES, gen)
    dict_out = gen({"P3": feats[0], "p4": feats[1], "P5": feats[2]}, SIZES)
    assert torch.equal(dict_out.boxes, gen(feats + [feats[2][:, :, ::2, ::2]], SIZES).boxes)  # extra levels ignored
    with pytest.raises(ValueError, match="stride 8"):
        gen(feats[1:] + [feats[2][:, :, ::2, ::2]], SIZES)  # P4, P5, P6 given as P3, P4, P5


def test_bfloat16_autocast_trains_and_gives_float32_anchors():
    gen, feats, targets = _generator(), [f.bfloat16() for f in _features()], _targets([3, 0, 2])
    gen.train()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = gen(feats, SIZES, targets)
        losses = gen.loss(out, targets, SIZES)
    sum(losses.values()).backward()
    assert out.boxes.dtype == out.scores.dtype == torch.float32
    assert all(torch.isfinite(v) for v in losses.values())


@pytest.mark.parametrize("dtype", ["float64", "float32"])
@pytest.mark.parametrize("options", [{}, {"min_probe_anchors": 3, "max_probe_patches": 2}])
def test_batched_equals_each_image_alone(options, dtype):
    """Padded batch vs each image's own unpadded maps: other shapes, so other conv kernels. The same math,
    proven in fp64 at ``FP64_SAME_MATH``; in fp32 within a small network's rounding (``FP32_NETWORK``,
    relative to O(1) scores and to the image size for boxes; measured here: boxes 1.4e-7 of the image,
    scores 5e-7). The selection is discrete: in fp32 a score within that rounding of a selection threshold
    could flip on another CPU; the seeded fixture has none here, and the fp64 run proves the math."""
    dtype, tol = getattr(torch, dtype), FP64_SAME_MATH if dtype == "float64" else FP32_NETWORK
    precision = Runtime(dtype=str(dtype).removeprefix("torch.")).precision
    gen, feats = _generator(**options).to(dtype), [f.to(dtype) for f in _features()]
    with torch.no_grad(), precision():
        batched = gen(feats, SIZES)
    assert batched.boxes.dtype == batched.scores.dtype == dtype
    assert len(batched.probe_windows) == 2  # both P4 and P3 probing ran
    for i, (h, w) in enumerate(SIZES.tolist()):
        # alone: the image's own unpadded maps, no other image
        alone_feats = [f[i:i + 1, :, : math.ceil(h / s), : math.ceil(w / s)] for f, s in zip(feats, (8, 16, 32))]
        with torch.no_grad(), precision():
            alone = gen(alone_feats, SIZES[i:i + 1])
        n = int(batched.valid[i].sum())
        assert n == int(alone.valid.sum()) == alone.boxes.shape[1]
        scale = torch.tensor([w, h, w, h], dtype=dtype)  # boxes relative to the image
        torch.testing.assert_close(batched.boxes[i, :n] / scale, alone.boxes[0] / scale, atol=tol, rtol=0)
        torch.testing.assert_close(batched.scores[i, :n], alone.scores[0], atol=tol, rtol=0)
        assert torch.equal(batched.source[i, :n], alone.source[0])


def test_probing_stops_early_when_nothing_is_uncertain():
    gen, feats = _generator(), _features()
    _score_bias(gen, 10.0)  # every fixed anchor scores ~1 > score_high: nothing in the band
    calls = []
    hooks = [gen.compress[k].register_forward_hook(lambda *a, k=k: calls.append(k)) for k in range(3)]
    with torch.no_grad():
        out = gen(feats, SIZES)
        fixed_only = AnchorGenerator(C, probe_levels=0)
        fixed_only.load_state_dict(gen.state_dict())
        reference = fixed_only.eval()(feats, SIZES)
    for hook in hooks:
        hook.remove()
    assert out.probe_windows == [] and out.probe.logits.shape == (0, gen.anchors_probe)
    assert calls.count(0) == calls.count(1) == 0  # P3 / P4 were never even compressed
    assert torch.equal(out.boxes, reference.boxes) and torch.equal(out.valid, reference.valid)
    assert (out.source[out.valid] <= 1).all()  # quadrant and P6 anchors only


def test_min_probe_anchors_skips_images_with_few_uncertain_anchors():
    gen, feats = _generator(), _features()
    with torch.no_grad():
        base = gen(feats, SIZES)
        gen.min_probe_anchors = 10 ** 6  # no image has that many: nobody probes, nothing is replaced
        none = gen(feats, SIZES)
        gen.probe_levels = 0
        fixed_only = gen(feats, SIZES)
    assert base.probe_windows[0] > 0 and none.probe_windows == []  # no image qualifies: early stop
    assert torch.equal(none.boxes, fixed_only.boxes) and torch.equal(none.valid, fixed_only.valid)


def test_gt_forcing_probes_the_gt_windows_and_outputs_their_anchors():
    gen, feats = _generator(), _features()
    _score_bias(gen, 10.0)  # nothing selected: without forcing only loss-only windows run
    targets = [Target(torch.tensor([[20.0, 20, 40, 36], [100, 100, 120, 130]]), torch.zeros(2, dtype=torch.long)),
               Target.empty(), Target(torch.tensor([[10.0, 10, 30, 30]]), torch.zeros(1, dtype=torch.long))]
    torch.manual_seed(0)
    plain = gen(feats, SIZES, targets)
    torch.manual_seed(0)
    forced = gen(feats, SIZES, targets, gt_forcing=True)
    assert not (plain.source[plain.valid] >= 2).any()  # loss-only windows never reach the output
    assert (forced.source[forced.valid] == 2).any()  # GT windows at P4 act as generated ones
    assert forced.probe_windows[0] == plain.probe_windows[0] == 3 * gen.min_train_patches


def test_min_and_max_anchors_per_image():
    gen, feats = _generator(min_anchors=7, max_anchors=20), _features()
    _score_bias(gen, -10.0)  # nothing passes keep_score: the minimum is filled from the fixed patches
    with torch.no_grad():
        out = gen(feats, SIZES)
    assert out.valid.sum(1).tolist() == [7, 7, 7] and out.probe_windows == []
    _score_bias(gen, 10.0)  # all 50 fixed anchors pass: capped at 20
    with torch.no_grad():
        out = gen(feats, SIZES)
    assert out.valid.sum(1).tolist() == [20, 20, 20]
    with pytest.raises(ValueError):
        AnchorGenerator(C, min_anchors=60, anchors_fixed=10)


def test_loss_with_no_ground_truth_is_finite_and_has_gradients():
    gen, feats = _generator(), _features()
    gen.train()
    targets = [Target.empty() for _ in range(3)]
    losses = gen.loss(gen(feats, SIZES, targets), targets, SIZES)
    assert losses["loss_anchor_l1"] == 0 and losses["loss_anchor_giou"] == 0
    assert torch.isfinite(losses["loss_anchor_cls"]) and losses["loss_anchor_cls"] > 0
    sum(losses.values()).backward()
    for name, param in gen.named_parameters():  # every part is trained, the P3 / P4 compressions too
        assert param.grad is not None and torch.isfinite(param.grad).all(), name
    assert gen.mlp_fixed[-1].weight.grad.abs().sum() > 0 and gen.mlp_probe[-1].weight.grad.abs().sum() > 0


@pytest.mark.parametrize("dtype,tol", [("float64", FP64_SAME_MATH), ("float32", FP32_NETWORK)])
def test_loss_does_not_grow_with_the_batch(dtype, tol):
    # batch 2 vs 4 runs other conv kernels: the same math, proven in fp64; fp32 within a network's rounding
    with Runtime(dtype=dtype).precision():
        gen = _generator(min_train_patches=0, probe_levels=0).to(torch.get_default_dtype())  # deterministic: no random windows
        gen.train()
        feats, targets = [f.to(torch.get_default_dtype()) for f in _features(batch=2)], _targets([2, 1])
        sizes = SIZES[:2]
        one = gen.loss(gen(feats, sizes, targets), targets, sizes)
        doubled = [torch.cat((f, f)) for f in feats]
        two = gen.loss(gen(doubled, torch.cat((sizes, sizes)), targets * 2), targets * 2, torch.cat((sizes, sizes)))
    for key in one:
        assert one[key].dtype == getattr(torch, dtype), key
        torch.testing.assert_close(one[key], two[key], rtol=tol, atol=0)


def _p6_patches(hflip, vflip, w=100.0, h=80.0):
    n = len(hflip)
    return PatchPredictions(
        logits=torch.zeros(n, 1), boxes=torch.zeros(n, 1, 4), regions=torch.tensor([[0.0, 0.0, w, h]] * n),
        image_index=torch.zeros(n, dtype=torch.long), hflip=torch.tensor(hflip), vflip=torch.tensor(vflip),
        whole_image=torch.ones(n, dtype=torch.bool), max_size=torch.full((n,), float("inf")),
        level=torch.full((n,), 6))


def test_p6_flip_targets_by_hand():
    # box xyxy (10, 8, 30, 24) in a 100 x 80 image: cxcywh normalised (0.2, 0.2, 0.2, 0.2)
    target = [Target(torch.tensor([[10.0, 8.0, 30.0, 24.0]]), torch.tensor([0]))]
    gt, mask = patch_targets(_p6_patches([False, True, False, True], [False, False, True, True]), target)
    expected = torch.tensor([[0.2, 0.2, 0.2, 0.2],   # P6
                             [0.8, 0.2, 0.2, 0.2],   # h-flip: cx -> 1 - cx (the reference gave 0.8, 0.2, 0.8, 0.2)
                             [0.2, 0.8, 0.2, 0.2],   # v-flip: cy -> 1 - cy
                             [0.8, 0.8, 0.2, 0.2]])  # both
    torch.testing.assert_close(gt[:, 0], expected)
    assert mask.all()


def test_quadrant_and_probe_targets_are_clipped_and_filtered_by_hand():
    # image 100 x 80; quadrant TR = x [50, 100), y [0, 40); a probe window x [0, 48), y [16, 64), limit 48
    patches = PatchPredictions(
        logits=torch.zeros(2, 1), boxes=torch.zeros(2, 1, 4), regions=torch.tensor([[50.0, 0, 100, 40], [0.0, 16, 48, 64]]),
        image_index=torch.zeros(2, dtype=torch.long), hflip=torch.zeros(2, dtype=torch.bool),
        vflip=torch.zeros(2, dtype=torch.bool), whole_image=torch.zeros(2, dtype=torch.bool),
        max_size=torch.tensor([float("inf"), 48.0]), level=torch.tensor([5, 3]))
    boxes = torch.tensor([[40.0, 10, 80, 30],    # centre (60, 20): in TR, clipped to x >= 50
                          [10.0, 20, 30, 40],    # centre (20, 30): in the probe window only
                          [0.0, 10, 49, 70]])    # centre (24.5, 40) in the window but 60 px tall: too big
    gt, mask = patch_targets(patches, [Target(boxes, torch.zeros(3, dtype=torch.long))])
    assert mask.tolist() == [[True, False, False], [False, True, False]]
    torch.testing.assert_close(gt[0, 0], torch.tensor([0.3, 0.5, 0.6, 0.5]))  # x 50..80 of 50, y 10..30 of 40
    torch.testing.assert_close(gt[1, 1], torch.tensor([20 / 48, 14 / 48, 20 / 48, 20 / 48]))


@pytest.mark.parametrize("area_weight", [1.0, 4.0])
def test_loss_golden_values_on_one_literal_patch(area_weight):
    # one 100 x 100 quadrant-like patch, GT (10, 10, 50, 50) -> normalised cxcywh (0.3, 0.3, 0.4, 0.4)
    boxes = torch.tensor([[[0.3, 0.3, 0.4, 0.2],     # IoU 0.5, GIoU 0.5, L1 0.2: matched
                           [0.8, 0.8, 0.2, 0.2],     # disjoint: a plain negative
                           [0.3, 0.3, 0.4, 0.25]]])  # IoU 0.625, unmatched: ignored (no score loss)
    logits = torch.tensor([[1.0, -2.0, -1.0]])
    patch = PatchPredictions(
        logits=logits, boxes=boxes, regions=torch.tensor([[0.0, 0, 100, 100]]), image_index=torch.tensor([0]),
        hflip=torch.tensor([False]), vflip=torch.tensor([False]), whole_image=torch.tensor([False]),
        max_size=torch.tensor([float("inf")]), level=torch.tensor([5]))
    target = [Target(torch.tensor([[10.0, 10, 50, 50]]), torch.tensor([0]))]
    weights = GeneratorLossWeights(cls=1.0, l1=1.0, giou=1.0, area_weight=area_weight, box_weighting=False)
    losses = generator_loss(patch, empty_patches(logits, 3), target, torch.tensor([[100, 100]]), weights)
    a = area_weight - (area_weight - 1) * 0.4  # A - (A - 1) sqrt(0.4 * 0.4)
    sig = torch.sigmoid
    positive = (math.log1p(math.e) - 0.5 * 1.0) * (sig(torch.tensor(1.0)) - 0.5) ** 2 * a  # BCE(1, 0.5) |0.5 - s|^2 a
    negative = math.log1p(math.exp(-2.0)) * sig(torch.tensor(-2.0)) ** 2                    # BCE(-2, 0) s^2
    # assert_close's fp32 default (atol 1e-5 + rtol 1.3e-6) on values ≤ 1.2: > 10x the ≤ 60 roundings
    # (s - 0.5 cancels 3x) of either side, ≤ 4e-7 absolute
    torch.testing.assert_close(losses["loss_anchor_cls"], positive + negative)
    torch.testing.assert_close(losses["loss_anchor_l1"], torch.tensor(0.2 * a))
    torch.testing.assert_close(losses["loss_anchor_giou"], torch.tensor(0.5 * a))


def test_per_patch_hungarian_matching_on_a_literal_cost():
    cost = torch.tensor([
        [[1.0, 2.0], [1.5, 10.0], [5.0, 5.0]],   # 2 GT: greedy would take (0,0)+(2,1)=6, optimum (0,1)+(1,0)=3.5
        [[4.0, 0.0], [0.2, 0.0], [3.0, 0.0]],    # 1 GT (column 1 is padding): cheapest row 1
        [[0.0, 0.0], [0.0, 0.0], [0.0, 0.0]],    # no GT
    ])
    mask = torch.tensor([[True, True], [True, False], [False, False]])
    patch, pred, gt = match_patches(cost, mask)
    pairs = sorted(zip(patch.tolist(), pred.tolist(), gt.tolist()))
    assert pairs == [(0, 0, 1), (0, 1, 0), (1, 1, 0)]


def test_training_windows_reach_the_minimum_and_contain_small_gt():
    targets = [Target(torch.tensor([[20.0, 30, 40, 44]]), torch.zeros(1, dtype=torch.long)), Target.empty()]
    sizes = torch.tensor([[128, 128], [128, 96]])
    generated = torch.tensor([[0, 0]]), torch.tensor([1])  # one generated window in image 1
    torch.manual_seed(0)
    tl, img, loss_only = training_windows(*generated, targets, sizes, stride=8, size=6, min_patches=3, nms_iou=0.25)
    assert torch.bincount(img).tolist() == [3, 3] and loss_only.tolist() == [False] + [True] * 5
    assert tl[0].tolist() == [0, 0] and (tl >= 0).all()
    cells = torch.ceil(sizes.flip(-1) / 8)[img]
    assert (tl + 6 <= cells).all()  # inside the image
    gt_window = tl[1]  # image 0's first extra window is its GT window: the box lies inside it
    assert (gt_window * 8 <= torch.tensor([20, 30])).all() and ((gt_window + 6) * 8 >= torch.tensor([40, 44])).all()


def test_window_ops_by_hand():
    x = torch.arange(2 * 1 * 4 * 4, dtype=torch.float32).reshape(2, 1, 4, 4)
    tokens = gather_windows(x, torch.tensor([1]), torch.tensor([[2, 1]]), 3)  # x 2..4, y 1..3, zero past the edge
    assert tokens[0, :, 0].tolist() == [22, 23, 0, 26, 27, 0, 30, 31, 0]
    tl = place_windows(torch.tensor([[4.0, 4.0], [150.0, 60.0]]), torch.tensor([[128, 160], [128, 160]]), 16, 6)
    assert tl.tolist() == [[0, 0], [4, 0]]  # clamped at 0; moved left to end at cell 10 (160 / 16)
    feats = torch.arange(25.0).reshape(1, 1, 5, 5)
    same = resample_valid_region(feats, torch.tensor([[160, 160]]), 32, 5)
    torch.testing.assert_close(same, feats)  # identity when the grid equals the valid region


def _recall(gen, feats, batch, threshold):
    from torchvision.ops import box_iou

    gen.eval()
    with torch.no_grad():
        out = gen(feats, batch.image_sizes)
    hits = sum(int((box_iou(t.boxes, out.boxes[i][out.valid[i]]).max(1).values >= threshold).sum())
               for i, t in enumerate(batch.targets))
    return hits / sum(len(t.boxes) for t in batch.targets), out


def test_generator_learns_to_recall_scene_objects(tmp_path):
    """Overfit: the generator alone on frozen random-conv FPN maps of 8 scene images (19 objects).

    Measured (1 thread): recall@0.5 0.05 at init, 1.00 after 300 steps (recall@0.7 also 1.00),
    ~18 anchors per image, 5-8 s of training on the shared 2-core machine.
    """
    from distill.data import DetectionTransform, collate, generate_scenes, load_dataset

    generate_scenes(tmp_path / "scenes", num_train=8, num_val=1, size=128, seed=3, negative_fraction=0.0)
    dataset = load_dataset(tmp_path / "scenes", "train", DetectionTransform(128, hflip_prob=0.0))
    batch = collate([dataset.get(i, flip=False) for i in range(len(dataset))])
    assert sum(len(t.boxes) for t in batch.targets) >= 12
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        torch.manual_seed(0)
        stem = torch.nn.Sequential(*[m for k in range(3) for m in (torch.nn.Conv2d(3 if k == 0 else C, C, 3, 2, 1), torch.nn.ReLU())])
        down = torch.nn.Conv2d(C, C, 3, 2, 1)
        with torch.no_grad():  # frozen random features: strides 8, 16, 32
            p3 = stem(batch.images)
            p4 = down(p3)
            feats = [p3, p4, down(p4)]
        gen = AnchorGenerator(C)
        before, _ = _recall(gen, feats, batch, 0.5)
        optimizer = torch.optim.AdamW(gen.parameters(), lr=1e-3, weight_decay=0.0)
        start = time.perf_counter()
        for _ in range(300):
            gen.train()
            losses = gen.loss(gen(feats, batch.image_sizes, batch.targets), batch.targets, batch.image_sizes)
            optimizer.zero_grad()
            sum(losses.values()).backward()
            optimizer.step()
        elapsed = time.perf_counter() - start
        recall, out = _recall(gen, feats, batch, 0.5)
        strict, _ = _recall(gen, feats, batch, 0.7)
    finally:
        torch.set_num_threads(threads)
    print(f"anchor recall@0.5 {before:.2f} -> {recall:.2f} (@0.7 {strict:.2f}), anchors {out.valid.sum(1).tolist()}, {elapsed:.1f} s")
    assert before < 0.3
    assert recall >= 0.9 and strict >= 0.8, (recall, strict)
