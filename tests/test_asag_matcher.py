"""Hungarian matching of the sparse detectors: literal cost matrices, valid queries, empty GT, groups."""
import torch

from distill.structures import Predictions, Target
from students.sparse.matcher import HungarianMatcher, area_weight, solve_assignment


def test_solve_assignment_on_a_literal_cost_matrix():
    # Greedy (row by row, cheapest first) takes (0, 0) = 1, then (1, 2) = 8 and (2, 1) = 3: 12.
    # The optimum over the 6 permutations is (0, 1) + (1, 0) + (2, 2) = 2 + 2 + 2 = 6.
    cost = torch.tensor([[1.0, 2.0, 9.0], [2.0, 9.0, 8.0], [9.0, 3.0, 2.0]])
    rows, cols = solve_assignment(cost)
    assert sorted(zip(rows.tolist(), cols.tolist())) == [(0, 1), (1, 0), (2, 2)]
    assert cost[rows, cols].sum().item() == 6.0


def test_solve_assignment_rectangular_and_empty():
    # 4 queries, 2 GTs: query 3 is the cheapest for both GTs, but (1, 0) + (3, 1) = 0.7 beats
    # (0, 1) + (3, 0) = 1.1 and (3, 0) + (1, ...) alternatives.
    cost = torch.tensor([[5.0, 1.0], [0.5, 4.0], [3.0, 3.0], [0.1, 0.2]])
    rows, cols = solve_assignment(cost)
    assert sorted(zip(rows.tolist(), cols.tolist())) == [(1, 0), (3, 1)]
    rows, cols = solve_assignment(torch.zeros(3, 0))
    assert rows.numel() == 0 and cols.numel() == 0
    rows, cols = solve_assignment(torch.tensor([[float("nan"), 1.0], [2.0, 3.0]]))  # NaN never crashes scipy
    assert sorted(zip(rows.tolist(), cols.tolist())) == [(0, 1), (1, 0)]


def _predictions(boxes, logits, valid=None):
    boxes = torch.tensor(boxes, dtype=torch.float32)[None]
    logits = torch.tensor(logits, dtype=torch.float32)[None]
    valid = torch.ones(boxes.shape[:2], dtype=torch.bool) if valid is None else torch.tensor(valid)[None]
    return Predictions(logits, boxes, valid)


SIZE = torch.tensor([[100, 100]])
GT = Target(torch.tensor([[10.0, 10.0, 40.0, 40.0], [50.0, 50.0, 90.0, 80.0]]), torch.tensor([1, 0]))


def test_matcher_cost_matrix_entries_by_hand():
    matcher = HungarianMatcher()
    pred = _predictions([[10.0, 10.0, 40.0, 40.0]], [[0.0, 0.0]])
    cost = matcher.cost_matrix(pred.logits[0], pred.boxes[0], GT, SIZE[0])  # (1, 2)
    # Query = GT 0 exactly: L1 0, GIoU 1; p = 0.5: pos - neg = 0.25 * 0.25 * ln2 - 0.75 * 0.25 * ln2.
    focal = 0.25 * 0.25 * 0.6931472 - 0.75 * 0.25 * 0.6931472
    # focal through sigmoid / log (≤ 16 roundings of |2 focal| ≈ 0.17) and an exact GIoU of 1: ≤ 2e-7, < 1e-5 / 10
    assert abs(cost[0, 0].item() - (2 * focal - 2 * 1.0)) < 1e-5
    # Against GT 1: normalised cxcywh L1 |0.25-0.7| + |0.25-0.65| + |0.3-0.4| + |0.3-0.3| = 0.95;
    # GIoU = 0 - (enclosing 80*70 - union 900+1200) / (80*70) = -0.625.
    # ≤ 16 roundings of terms summing to |5.6|: ≤ 5.4e-6, < 1e-4 / 10
    assert abs(cost[0, 1].item() - (2 * focal + 5 * 0.95 + 2 * 0.625)) < 1e-4


def test_matcher_pairs_each_gt_with_its_box_and_skips_invalid_queries():
    boxes = [[50.0, 50.0, 90.0, 80.0], [0.0, 0.0, 5.0, 5.0], [10.0, 10.0, 40.0, 40.0], [11.0, 10.0, 40.0, 41.0]]
    matches = HungarianMatcher()(_predictions(boxes, [[0.0, 0.0]] * 4), [GT], SIZE)
    assert sorted(zip(matches.pred_index[0].tolist(), matches.gt_index[0].tolist())) == [(0, 1), (2, 0)]
    # Query 2 invalid: the next-best box (query 3) takes GT 0.
    matches = HungarianMatcher()(_predictions(boxes, [[0.0, 0.0]] * 4, [True, True, False, True]), [GT], SIZE)
    assert sorted(zip(matches.pred_index[0].tolist(), matches.gt_index[0].tolist())) == [(0, 1), (3, 0)]


def test_matcher_empty_gt_and_no_valid_query():
    pred = _predictions([[0.0, 0.0, 5.0, 5.0]] * 2, [[0.0, 0.0]] * 2)
    matches = HungarianMatcher()(pred, [Target.empty()], SIZE)
    assert matches.pred_index[0].numel() == 0 and matches.gt_index[0].numel() == 0
    pred = _predictions([[0.0, 0.0, 5.0, 5.0]] * 2, [[0.0, 0.0]] * 2, [False, False])
    assert HungarianMatcher()(pred, [GT], SIZE).pred_index[0].numel() == 0


def test_matcher_one_to_one_per_group():
    # Two groups of 3 queries; every GT gets exactly one query of each group.
    boxes = [[10.0, 10.0, 40.0, 40.0], [50.0, 50.0, 90.0, 80.0], [0.0, 0.0, 5.0, 5.0]] * 2
    groups = torch.tensor([0, 0, 0, 1, 1, 1])
    matches = HungarianMatcher()(_predictions(boxes, [[0.0, 0.0]] * 6), [GT], SIZE, groups)
    pairs = sorted(zip(matches.pred_index[0].tolist(), matches.gt_index[0].tolist()))
    assert pairs == [(0, 0), (1, 1), (3, 0), (4, 1)]


def test_area_weight_small_boxes_heavier():
    gt = torch.tensor([[0.5, 0.5, 1.0, 1.0], [0.5, 0.5, 0.0, 0.0], [0.5, 0.5, 0.25, 0.25]])
    # A - (A - 1) sqrt(w h) on dyadic literals: exact (allclose's default leaves > 10x anyway)
    assert torch.allclose(area_weight(gt, 4.0), torch.tensor([1.0, 4.0, 3.25]))
    assert torch.allclose(area_weight(gt, 1.0), torch.ones(3))
