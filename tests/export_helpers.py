"""Comparing an exported graph's padded detections with PyTorch's (tests/test_export.py, tests/test_refine.py)."""
import torch


def assert_same_detections(expected, got, tol: float, side: int) -> None:
    """onnxruntime outputs ``got`` (padded rows) = PyTorch detections ``expected`` within ``tol``
    (boxes relative to the canvas ``side``, scores absolute), paired one to one."""
    worst_box = worst_score = 0.0
    for b, det in enumerate(expected):
        valid = torch.from_numpy(got["valid"][b])
        assert int(valid.sum()) == len(det.scores) > 0, f"image {b}"
        assert not got["scores"][b][~valid.numpy()].any()  # padding rows are zero
        boxes, scores = torch.from_numpy(got["boxes"][b])[valid], torch.from_numpy(got["scores"][b])[valid]
        labels = torch.from_numpy(got["labels"][b])[valid]
        assert (scores[:-1] >= scores[1:]).all()  # descending, as PyTorch's
        # Paired one to one, not row by row: two candidates whose scores differ by less than the
        # rounding error (random heads give many) may come out in either order.
        pair = pair_detections(boxes, scores, labels, det)
        worst_box = max(worst_box, (boxes[pair] - det.boxes).abs().max().item())
        worst_score = max(worst_score, (scores[pair] - det.scores).abs().max().item())
    assert worst_box <= tol * side, (worst_box, tol * side)  # pixels: relative to the canvas side
    assert worst_score <= tol, (worst_score, tol)  # scores are in [0, 1]


def pair_detections(boxes, scores, labels, det) -> torch.Tensor:
    """Index into the onnxruntime rows of each PyTorch detection: same label, nearest box and score
    (a minimum-cost one-to-one assignment)."""
    from scipy.optimize import linear_sum_assignment

    cost = (det.boxes[:, None] - boxes[None]).abs().amax(-1) + (det.scores[:, None] - scores[None]).abs()
    cost = torch.where(det.labels[:, None] == labels[None], cost, torch.full_like(cost, 1e9))
    rows, cols = linear_sum_assignment(cost.double().numpy())
    assert cost[rows, cols].max() < 1e9, "a detection has no counterpart of its class"
    return torch.as_tensor(cols)[torch.as_tensor(rows).argsort()]
