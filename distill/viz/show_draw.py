"""Drawing of a :class:`~distill.viz.show_data.ShowView`: one PNG, rows of panels.

Row 1: ground truth, student detections, teacher detections, generated anchors (when present).
Then one row per region (heat map of its weights per FPN level over the image) and one panel per
matched pairer (linked boxes: student prediction, teacher prediction, the student's GT).
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
from matplotlib.patches import Rectangle

from distill.viz.figures import new_figure, save_png
from distill.viz.show_data import RegionMap, ShowView

PANEL_PX = 260
HEAT_ALPHA = 0.6
HEAT_CMAP = "plasma"
COLOURS = {"gt": "#00c853", "student": "#2979ff", "teacher": "#ff9100", "anchor": "#e040fb"}
LEVEL_COLUMNS = 5  # FPN levels per region row
MAX_DRAWN = 12  # detections per panel


def draw_view(view: ShowView, path: Path, score_thresh: float = 0.3) -> Path:
    levels = shown_levels(view.regions)
    top = 2 + (view.teacher is not None) + (view.anchors is not None)
    pair_panels = len(view.pairs)
    columns = max(top, min(len(levels), LEVEL_COLUMNS), min(pair_panels, 4), 1)
    rows = 1 + len(view.regions) + -(-pair_panels // columns)
    fig = new_figure(PANEL_PX * columns, PANEL_PX * rows + 50)
    grid = fig.add_gridspec(rows, columns)
    empty = [f"P{_level_name(s)}" for l, s in enumerate(view.regions[0].strides) if l not in levels] if view.regions else []
    fig.suptitle(f"image {view.image_id}: {view.student_name}" + (f" vs teacher {view.teacher_name}" if view.teacher_name else "")
                 + (f"  (no region weight on {', '.join(empty)})" if empty else ""), fontsize=10)
    panels = [("ground truth", lambda ax: _boxes(ax, view.target.boxes.numpy(), view.target.labels.numpy(), None, view.classes, COLOURS["gt"]))]
    panels.append((f"student ({view.student_name})", lambda ax: _detections(ax, view.student, view.classes, score_thresh, COLOURS["student"])))
    if view.teacher is not None:
        panels.append((f"teacher ({view.teacher_name})", lambda ax: _detections(ax, view.teacher, view.classes, score_thresh, COLOURS["teacher"])))
    if view.anchors is not None:
        panels.append((f"generated anchors ({len(view.anchors)})", lambda ax: _anchors(ax, view.anchors)))
    for c, (title, draw) in enumerate(panels):
        ax = image_axes(fig.add_subplot(grid[0, c]), view.image, title)
        draw(ax)
    for r, region in enumerate(view.regions, start=1):
        for c, l in enumerate(levels[:columns]):
            peak = float(region.level(l).max())
            title = f"{region.name} P{_level_name(region.strides[l])} (stride {region.strides[l]})" + (f" max {peak:.2f}" if peak > 0 else "")
            ax = image_axes(fig.add_subplot(grid[r, c]), view.image, title)
            heat_map(ax, region, l)
    _key(fig, view)
    first = 1 + len(view.regions)
    for i, pairs in enumerate(view.pairs):
        ax = image_axes(fig.add_subplot(grid[first + i // columns, i % columns]), view.image, f"pairs: {pairs.name} ({len(pairs.weight)})")
        _linked(ax, pairs)
    return save_png(fig, path)


def shown_levels(regions: list[RegionMap]) -> list[int]:
    """FPN levels where some region has weight (at least the first): empty levels are named, not drawn."""
    if not regions:
        return []
    count = len(regions[0].level_sizes)
    levels = [l for l in range(count) if any(r.level(l).max() > 0 for r in regions)]
    return levels or [0]


def _key(fig, view: ShowView) -> None:
    """What the colours mean, under the panels."""
    from matplotlib.lines import Line2D

    entries = [("ground truth", COLOURS["gt"], "-"), ("student", COLOURS["student"], "-")]
    if view.teacher is not None:
        entries.append(("teacher" + (" (dashed in pairs)" if view.pairs else ""), COLOURS["teacher"], "-"))
    if view.anchors is not None:
        entries.append(("generated anchors", COLOURS["anchor"], "-"))
    if view.regions:
        entries.append(("region weight (bright = high, own scale per region)", "#f0f921", "-"))
    handles = [Line2D([], [], color=c, ls=ls, lw=2) for _, c, ls in entries]
    fig.legend(handles, [e[0] for e in entries], loc="outside lower center", ncol=len(entries), fontsize=7, frameon=False)


def _level_name(stride: int) -> int:
    return int(round(np.log2(stride)))


def image_axes(ax, image: np.ndarray, title: str):
    """``ax`` showing ``image`` (h, w, 3) with data coordinates = input pixels (y down)."""
    h, w = image.shape[:2]
    ax.imshow(image, extent=(0, w, h, 0), interpolation="nearest")
    ax.set_xlim(0, w)
    ax.set_ylim(h, 0)
    ax.set_xticks([])
    ax.set_yticks([])
    ax.set_title(title, fontsize=8)
    return ax


def heat_map(ax, region: RegionMap, level: int, vmax: float | None = None):
    """Level ``level``'s weights over the image: cell (i, j) covers x in [j*s, (j+1)*s), y in
    [i*s, (i+1)*s) (the location centre is at ((j + 0.5) s, (i + 0.5) s)); zero cells stay clear."""
    weights = region.level(level)
    stride = region.strides[level]
    h, w = weights.shape
    # each region on its own scale: VLR weights are IoUs (often < 0.3), main / gt_boxes are 1
    vmax = vmax if vmax is not None else (float(region.weights.max()) or 1.0)
    ax.imshow(np.ma.masked_where(weights <= 0, weights), extent=(0, w * stride, h * stride, 0), cmap=HEAT_CMAP, vmin=0, vmax=vmax,
              alpha=HEAT_ALPHA, interpolation="nearest")
    ax.set_xlim(0, ax.images[0].get_extent()[1])
    ax.set_ylim(ax.images[0].get_extent()[2], 0)
    return ax


def _boxes(ax, boxes: np.ndarray, labels: np.ndarray, scores, classes: list[str], colour: str) -> None:
    for k, box in enumerate(boxes):
        x1, y1, x2, y2 = box
        ax.add_patch(Rectangle((x1, y1), x2 - x1, y2 - y1, fill=False, edgecolor=colour, lw=1.5))
        text = classes[int(labels[k])] + (f" {scores[k]:.2f}" if scores is not None else "")
        ax.text(x1, y1, text, fontsize=6, color="black", va="bottom", bbox={"facecolor": colour, "edgecolor": "none", "pad": 0.5, "alpha": 0.8}, clip_on=True)


def _detections(ax, det, classes: list[str], score_thresh: float, colour: str) -> None:
    """The ``MAX_DRAWN`` highest-scoring detections above ``score_thresh`` (more hide the image)."""
    order = det.scores.argsort(descending=True)[:MAX_DRAWN]
    order = order[det.scores[order] >= score_thresh].numpy()
    _boxes(ax, det.boxes.numpy()[order], det.labels.numpy()[order], det.scores.numpy()[order], classes, colour)


def _anchors(ax, anchors: np.ndarray) -> None:
    for x1, y1, x2, y2 in anchors:
        ax.add_patch(Rectangle((x1, y1), x2 - x1, y2 - y1, fill=False, edgecolor=COLOURS["anchor"], lw=0.8, alpha=0.7))


def _centre(box: np.ndarray) -> tuple[float, float]:
    return float(box[0] + box[2]) / 2, float(box[1] + box[3]) / 2


def _linked(ax, pairs) -> None:
    """Student box (blue), teacher box (orange, dashed), GT (green): a line joins each pair's centres."""
    top = float(pairs.weight.max()) if len(pairs.weight) else 1.0
    for s, t, g, wgt in zip(pairs.student, pairs.teacher, pairs.gt, pairs.weight):
        alpha = 0.35 + 0.65 * float(wgt) / top if top > 0 else 1.0
        for box, colour, style in ((s, COLOURS["student"], "-"), (t, COLOURS["teacher"], "--")):
            ax.add_patch(Rectangle((box[0], box[1]), box[2] - box[0], box[3] - box[1], fill=False, edgecolor=colour, ls=style, lw=1.2, alpha=alpha))
        (sx, sy), (tx, ty) = _centre(s), _centre(t)
        ax.plot([sx, tx], [sy, ty], color="white", lw=1.0, alpha=alpha)
        if not np.isnan(g).any():
            ax.add_patch(Rectangle((g[0], g[1]), g[2] - g[0], g[3] - g[1], fill=False, edgecolor=COLOURS["gt"], lw=1.2, alpha=alpha))
            gx, gy = _centre(g)
            ax.plot([sx, gx], [sy, gy], color=COLOURS["gt"], lw=0.8, alpha=alpha, ls=":")
