"""DAB-DETR: anchor embeddings and modulated attention on literal numbers, the detached box chain,
Group DETR isolation, and one- and six-layer models that overfit four scene images."""
import math

import pytest
import torch
from tolerances import fp32_chain

from distill.data import DetectionTransform, collate, generate_scenes, load_dataset
from distill.engine.evaluate import evaluate_detector
from students import create_student
from students.sparse.dab_detr.attention import ConditionalCrossAttention, modulate_position
from students.sparse.dab_detr.decoder import QUERY_PE_TEMPERATURE
from students.sparse.dab_detr.embedding import (
    IMAGE_PE_TEMPERATURE,
    anchors_to_pixels,
    flatten_memory,
    inverse_sigmoid,
    pixels_to_anchors,
    refine_anchors,
)
from students.sparse.layers import sine_embedding

# sin / cos of fp32 angles ≤ 2π: the angle carries ≤ 3 roundings (2π, the product, the division), the
# sine its own: ≤ 4 roundings of 2π absolute (tests/tolerances.py), ≈ 1.5e-5
ANGLE_ATOL = 2 * math.pi * fp32_chain(4)

R2 = math.sqrt(2) / 2
TINY_DAB = dict(backbone="mobilenetv3_small_050", num_classes=3, strides=(8, 16, 32), hidden_dim=32, num_queries=4,
                ffn_dim=64, num_heads=4, encoder_layers=1, pretrained=None)


def test_sine_embedding_of_a_literal_box():
    # 4 dims per value = 2 frequencies: temperature^(2 i / 4) = 1 and 2 with temperature 4, so the
    # angles are 2 pi v and pi v: x = 1/4 -> (pi/2, pi/4), y = 1/2 -> (pi, pi/2), w = 1/8 -> (pi/4, pi/8),
    # h = 1 -> (2 pi, pi); per value [sin, sin, cos, cos].
    out = sine_embedding(torch.tensor([0.25, 0.5, 0.125, 1.0]), 4, temperature=4.0)
    s8, c8 = math.sin(math.pi / 8), math.cos(math.pi / 8)  # 0.38268, 0.92388
    expected = [1, R2, 0, R2] + [0, 1, -1, 0] + [R2, s8, R2, c8] + [0, 0, 1, -1]
    assert out.shape == (16,)
    torch.testing.assert_close(out, torch.tensor(expected, dtype=torch.float32), atol=ANGLE_ATOL, rtol=0)
    assert QUERY_PE_TEMPERATURE == 10000.0 and IMAGE_PE_TEMPERATURE == 20.0  # the reference's two temperatures


def test_image_positions_are_normalised_per_image_at_temperature_20_and_padding_is_masked():
    # One 2 x 2 map of stride 32 on a 64 x 64 canvas; image 0 fills it, image 1 is 32 x 64 (row 1 is padding).
    feats = [torch.zeros(2, 8, 2, 2)]
    sizes = torch.tensor([[64, 64], [32, 64]])
    memory, pos, padding = flatten_memory(feats, (32,), sizes, None)
    assert memory.shape == (2, 4, 8) and pos.shape == (2, 4, 8)
    assert padding.tolist() == [[False] * 4, [False, False, True, True]]
    # cell (0, 0): centre (16, 16) px -> x = 16 / 64 = 1/4 in both images, y = 1/4 (image 0), 16 / 32 = 1/2 (image 1);
    # 4 dims per coordinate: angles 2 pi v and 2 pi v / sqrt(20).
    a = math.pi / 2 / math.sqrt(20)
    x = [1.0, math.sin(a), 0.0, math.cos(a)]
    torch.testing.assert_close(pos[0, 0], torch.tensor(x + x), atol=ANGLE_ATOL, rtol=0)
    torch.testing.assert_close(pos[1, 0], torch.tensor(x + [0.0, math.sin(2 * a), -1.0, math.cos(2 * a)]), atol=ANGLE_ATOL, rtol=0)


def _identity_attention() -> ConditionalCrossAttention:
    """One head over D = 4: content projections zero, position / value / output projections identity."""
    attn = ConditionalCrossAttention(4, num_heads=1, first=False)
    with torch.no_grad():
        for name, layer in attn.named_children():
            layer.bias.zero_()
            layer.weight.copy_(torch.zeros(4, 4) if name in ("q_content", "k_content") else torch.eye(4))
    return attn


def test_width_and_height_modulate_the_positional_attention_logits():
    # Sine (D / 2 = 2 dims per coordinate, one frequency) of the anchor centre (x, y) = (1/4, 1/2):
    # x: [sin(pi/2), cos(pi/2)] = [1, 0]; y: [sin(pi), cos(pi)] = [0, -1].
    sine_xy = torch.tensor([[[1.0, 0.0, 0.0, -1.0]]])
    ref = torch.tensor([[[0.25, 0.25]]])
    # tokens at (1/4, 1/2) and (3/4, 1/2): x parts [1, 0] and [sin(3 pi / 2), cos(3 pi / 2)] = [-1, 0]
    k_pos = torch.tensor([[[1.0, 0.0, 0.0, -1.0], [-1.0, 0.0, 0.0, -1.0]]])
    attn = _identity_attention()
    zero_q, zero_k = torch.zeros(1, 1, 4), torch.zeros(1, 2, 4)
    scale = math.sqrt(8)  # one head: [content ; position] has 2 d = 8 dims

    def logits(anchor_wh):
        q_sine = modulate_position(sine_xy, ref, torch.tensor([[anchor_wh]]))
        return attn.logits(zero_q, q_sine, zero_k, k_pos)[0, 0, 0]

    # w = w_ref, h = h_ref: no modulation; the x terms give +1 / -1, the y terms +1 each.
    torch.testing.assert_close(logits([0.25, 0.25]), torch.tensor([2.0, 0.0]) / scale)
    # a wide anchor (w = 2 w_ref): the x half is halved -> x terms +-1/2
    torch.testing.assert_close(modulate_position(sine_xy, ref, torch.tensor([[[0.5, 0.25]]])), torch.tensor([[[0.5, 0.0, 0.0, -1.0]]]))
    torch.testing.assert_close(logits([0.5, 0.25]), torch.tensor([1.5, 0.5]) / scale)
    # a short anchor (h = h_ref / 2): the y half is doubled -> y terms +2
    torch.testing.assert_close(logits([0.25, 0.125]), torch.tensor([3.0, 1.0]) / scale)
    # forward: attention weights softmax(logits) over the two tokens, values = memory (identity projections)
    memory = torch.tensor([[[1.0, 0.0, 0.0, 0.0], [0.0, 1.0, 0.0, 0.0]]])
    q_sine = modulate_position(sine_xy, ref, torch.tensor([[[0.5, 0.25]]]))
    out = attn(torch.zeros(1, 1, 4), torch.zeros(1, 1, 4), q_sine, memory, k_pos, torch.zeros(1, 2, dtype=torch.bool))
    w = torch.softmax(torch.tensor([1.5, 0.5]) / scale, 0)
    torch.testing.assert_close(out[0, 0], torch.tensor([w[0], w[1], 0.0, 0.0]))
    # a padded token gets no weight
    out = attn(torch.zeros(1, 1, 4), torch.zeros(1, 1, 4), q_sine, memory, k_pos, torch.tensor([[False, True]]))
    torch.testing.assert_close(out[0, 0], torch.tensor([1.0, 0.0, 0.0, 0.0]))


def test_inverse_sigmoid_update_round_trips():
    x = torch.tensor([1e-3, 0.1, 0.5, 0.9, 0.999])
    # log's rounding of |logit| ≤ 6.9 (≈ 28 u absolute) carried through the sigmoid's slope x (1 - x), the
    # ratio and the sigmoid's own: ≈ 34 roundings relative to x (tests/tolerances.py)
    torch.testing.assert_close(torch.sigmoid(inverse_sigmoid(x)), x, atol=0, rtol=fp32_chain(40))
    assert inverse_sigmoid(torch.tensor(0.5)) == 0
    # values outside [1e-3, 1 - 1e-3] are clamped first: finite logits for boxes at or past the border
    torch.testing.assert_close(inverse_sigmoid(torch.tensor([0.0, 1.0])), torch.tensor([math.log(1e-3 / 0.999), math.log(0.999 / 1e-3)]))
    anchors = torch.tensor([[[0.5, 0.25, 0.5, 0.1]]])
    torch.testing.assert_close(refine_anchors(anchors, torch.zeros(1, 1, 4)), anchors)  # zero delta = the same box
    # sigmoid(0 + log 3) = 3/4: the centre moves right by a logit of log 3
    torch.testing.assert_close(refine_anchors(anchors, torch.tensor([[[math.log(3), 0, 0, 0]]]))[0, 0, 0], torch.tensor(0.75))
    sizes = torch.tensor([[40, 80]])
    pixels = anchors_to_pixels(anchors, sizes)  # (cx, cy, w, h) = (40, 10, 40, 4) px
    torch.testing.assert_close(pixels, torch.tensor([[[20.0, 8.0, 60.0, 12.0]]]))
    torch.testing.assert_close(pixels_to_anchors(pixels, sizes), anchors)


@pytest.mark.parametrize("box_head", ["delta", "bins"])
def test_each_layer_starts_from_the_previous_box_detached(box_head):
    torch.manual_seed(0)
    model = create_student("dab_detr", **TINY_DAB, decoder_layers=3, box_head=box_head).train()
    with torch.no_grad():
        model.decoder.box_head.last.weight.normal_(std=0.1)  # boxes move at every layer
    feats = model.features(torch.randn(2, 3, 64, 64))
    sizes = torch.tensor([[64, 64], [48, 64]])
    memory, pos, padding = model.memory(feats, sizes)
    queries = model.query_source(feats, sizes)
    anchors = pixels_to_anchors(queries.boxes, sizes)
    layers, inputs, _ = model.decoder(anchors, queries.valid, None, memory, pos, padding, sizes)
    assert len(layers) == len(inputs) == 3
    assert inputs[0].requires_grad  # the learned anchors learn from the first layer
    for l in (1, 2):
        assert not inputs[l].requires_grad and layers[l - 1].boxes.requires_grad
        # pixels -> anchors -> pixels: a few roundings of ≤ 64 px (≈ 1e-5), ≪ 1e-3
        torch.testing.assert_close(anchors_to_pixels(inputs[l], sizes), layers[l - 1].boxes.detach(), atol=1e-3, rtol=0)
        assert not torch.equal(inputs[l], inputs[l - 1])
        # no path from a layer's box back to the previous layer's box
        assert torch.autograd.grad(layers[l].boxes.sum(), layers[l - 1].boxes, retain_graph=True, allow_unused=True)[0] is None
    # but the content path is not detached: the last box reaches the first layer's weights
    grad = torch.autograd.grad(layers[2].boxes.sum(), model.decoder.layers[0].ffn.net[0].weight, retain_graph=True)[0]
    assert grad.abs().sum() > 0


def test_query_groups_never_see_each_other():
    torch.manual_seed(0)
    model = create_student("dab_detr", **TINY_DAB, decoder_layers=2, groups=3).train()
    x, sizes = torch.randn(2, 3, 64, 64), torch.tensor([[64, 64], [64, 48]])
    with torch.no_grad():
        before = model(x, sizes)
        model.query_source.box_logits[4:8] += 0.7  # move group 1's anchors only
        after = model(x, sizes)
    assert before.logits.shape == (2, 12, 3) and before.queries.groups.tolist() == [0] * 4 + [1] * 4 + [2] * 4
    # groups 0 and 2 unchanged, bit for bit: the same kernels on the same shapes in this process, and group 1
    # reaches them only through attention weights that are exactly 0
    for rows in (slice(0, 4), slice(8, 12)):
        torch.testing.assert_close(after.logits[:, rows], before.logits[:, rows], atol=0, rtol=0)
        torch.testing.assert_close(after.boxes[:, rows], before.boxes[:, rows], atol=0, rtol=0)
    assert not torch.allclose(after.logits[:, 4:8], before.logits[:, 4:8])
    model.eval()
    with torch.no_grad():
        assert model(x, sizes).logits.shape == (2, 4, 3)  # inference: group 0 only


def test_head_and_decode_queries_of_one_step_run_the_encoder_once():
    """The encoded tokens ride on the maps ``features`` returned: ``decode_queries`` after ``head``
    (shared queries, KD-DETR's points) reuses them, bit for bit what a fresh encoder pass gives."""
    torch.manual_seed(0)
    model = create_student("dab_detr", **TINY_DAB, decoder_layers=2).eval()
    calls = []
    model.encoder[0].register_forward_hook(lambda *args: calls.append(1))
    x, sizes = torch.randn(2, 3, 64, 64), torch.tensor([[64, 64], [64, 48]])
    boxes, valid = torch.tensor([[[4.0, 4.0, 30.0, 40.0]], [[10.0, 8.0, 50.0, 44.0]]]), torch.ones(2, 1, dtype=torch.bool)
    with torch.no_grad():
        features = model.features(x)
        model.head(features, sizes)
        reused = model.decode_queries(features, sizes, boxes, valid)
        assert len(calls) == 1
        fresh = model.decode_queries(list(features), sizes, boxes, valid)  # plain maps: encoded anew
        assert len(calls) == 2
        model.decode_queries(features, torch.tensor([[64, 64], [48, 64]]), boxes, valid)  # other sizes: encoded anew
        assert len(calls) == 3
    assert torch.equal(reused.logits, fresh.logits) and torch.equal(reused.boxes, fresh.boxes)


@pytest.mark.parametrize("layers", [1, 6])
def test_dab_detr_overfits_scene_images(tmp_path, layers):
    generate_scenes(tmp_path / "scenes", num_train=4, num_val=1, size=96, seed=5, negative_fraction=0.0)
    dataset = load_dataset(tmp_path / "scenes", "train", DetectionTransform(96, hflip_prob=0.0))
    batch = collate([dataset.get(i, flip=False) for i in range(len(dataset))])
    assert sum(len(t.boxes) for t in batch.targets) == 9
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    steps = 300
    try:
        torch.manual_seed(0)
        model = create_student(
            "dab_detr", backbone="mobilenetv3_small_050", num_classes=len(dataset.classes), strides=(8, 16, 32),
            hidden_dim=32, num_queries=16, ffn_dim=64, num_heads=4, decoder_layers=layers, encoder_layers=0,
        )
        optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.0)
        schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1 - step / steps)
        model.train()
        for _ in range(steps):
            predictions = model.head(model.features(batch.images), batch.image_sizes)
            losses, _ = model.loss(predictions, batch.targets, batch.image_sizes)
            optimizer.zero_grad()
            sum(losses.values()).backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            optimizer.step()
            schedule.step()
        metrics = evaluate_detector(model, dataset, batch_size=4)  # pycocotools on the same 4 images
    finally:
        torch.set_num_threads(threads)
    # Measured (seed 0): AP 1.0 for both after 300 steps (one layer 0.77, six 0.95 at step 200);
    # ~17 s (one layer) and ~38 s (six) on one thread of the 2-core dev machine.
    assert metrics["AP50"] >= 0.95, metrics
    assert metrics["AP"] >= 0.8, metrics


def test_the_bins_head_makes_dab_detr_ld_ready():
    from asag_helpers import image_sizes, images, targets

    torch.manual_seed(0)
    model = create_student("dab_detr", **TINY_DAB, decoder_layers=2, box_head="bins").train()
    assert model.spec.bins == 17 and model.spec.query_boxes and model.spec.fpn_channels == 32
    pred = model(images(), image_sizes())
    assert pred.bins.logits.shape == (3, 4, 4, 17) and len(pred.aux) == 1 and pred.aux[0].bins is not None
    losses, matches = model.loss(pred, targets(), image_sizes())
    assert {"loss_dfl", "loss_dfl_layer0", "loss_cls_layer0"} <= set(losses) and all(torch.isfinite(v) for v in losses.values())
    assert [len(i) for i in matches.pred_index] == [0, 1, 3] and len(matches.aux) == 1  # one query per GT, every layer
