"""Pictures and tables after a run: curves.png (train hook and ``detkd plot``), ``detkd show`` and
``detkd compare``. Pixel checks read the saved PNG back; numbers are computed by hand."""
import json

import numpy as np
import pytest
import torch
from cli_helpers import SMALL, invoke, make_scenes, one_error_line, train_one_epoch
from PIL import Image


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return make_scenes(tmp_path_factory.mktemp("viz") / "scenes")


@pytest.fixture(scope="module")
def trained(data):
    return train_one_epoch("gfl-tiny", data, data.parent / "run")


@pytest.fixture(scope="module")
def image_id(data):
    """The val image with the most GT boxes."""
    annotations = json.loads((data / "val.json").read_text())["annotations"]
    ids = [a["image_id"] for a in annotations]
    return max(set(ids), key=lambda i: (ids.count(i), -i))


def png(path):
    with Image.open(path) as img:
        return np.asarray(img.convert("RGB")).astype(int)


# ------------------------------------------------------------------------------------- curves
def fake_run(folder, records, kind="train", summary=None, teacher=None):
    folder.mkdir(parents=True)
    info = {"data": "scenes", "kind": kind, **({"teacher": teacher} if teacher else {})}
    (folder / "run.json").write_text(json.dumps(info))
    (folder / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    if summary is not None:
        (folder / "summary.json").write_text(json.dumps(summary))
    return folder


def test_smoothing_and_log_scale_by_hand():
    from distill.viz.curves import smooth, wants_log

    # window 2: beta 0.5; bias-corrected EMA: 1, (0.25 + 1.5) / 0.75
    np.testing.assert_allclose(smooth([1.0, 3.0], window=2), [1.0, 1.75 / 0.75])
    np.testing.assert_allclose(smooth([4.0, 2.0], window=1), [4.0, 2.0])
    assert wants_log([1.0, 100.0]) and not wants_log([1.0, 10.0]) and not wants_log([0.0, 100.0])


def test_curves_read_every_term_val_and_lr(tmp_path):
    from distill.viz.curves import read_curves

    run = fake_run(tmp_path / "r", [
        {"step": 0, "epoch": 1, "lr": 0.1, "loss": 3.0, "loss_qfl": 2.0, "loss_kd_main": 1.0},
        {"step": 1, "epoch": 1, "lr": 0.2, "skipped": "loss_qfl"},  # a skipped step: no values
        {"step": 2, "epoch": 1, "lr": 0.3, "loss": 2.0, "loss_qfl": 1.5, "loss_kd_main": 0.5, "grad_norm": 4.0},
        {"step": 3, "epoch": 1, "val": {"AP": 0.25, "AP50": 0.5}},
    ])
    curves = read_curves(run)
    assert curves.label == "r (train)"
    assert curves.terms == {"loss": ([0, 2], [3.0, 2.0]), "loss_qfl": ([0, 2], [2.0, 1.5]), "loss_kd_main": ([0, 2], [1.0, 0.5])}
    assert curves.lr == ([0, 1, 2], [0.1, 0.2, 0.3])
    assert curves.val == {"AP": ([3], [0.25]), "AP50": ([3], [0.5])}


def test_overlaid_curves_have_one_panel_per_term(tmp_path):
    from distill.viz.curves import COLUMNS, PANEL_PX, plot_curves, read_curves

    a = fake_run(tmp_path / "alone", [{"step": s, "lr": 0.1, "loss": 1.0 / (s + 1), "loss_qfl": 1.0} for s in range(5)])
    b = fake_run(tmp_path / "kd", [{"step": s, "lr": 0.1, "loss": 2.0, "loss_qfl": 1.0, "loss_kd_main": 0.1} for s in range(5)], kind="distill")
    path = plot_curves([read_curves(a), read_curves(b)], tmp_path / "out" / "curves.png")
    # panels: loss, loss_kd_main, loss_qfl, val AP, lr -> 2 rows of 4
    assert Image.open(path).size == (COLUMNS * PANEL_PX[0], 2 * PANEL_PX[1] + 50)
    assert [p.name for p in path.parent.iterdir()] == ["curves.png"]  # no temporary left


def test_train_writes_curves_and_plot_overlays_runs(trained, data, tmp_path):
    from distill.viz.curves import COLUMNS, PANEL_PX

    picture = trained / "curves.png"
    assert picture.is_file()  # written by the trainer at the end of the run
    assert Image.open(picture).size == (COLUMNS * PANEL_PX[0], 2 * PANEL_PX[1] + 50)  # loss, dfl, giou, qfl | val AP, lr
    picture.unlink()
    result = invoke("plot", trained)
    assert result.exit_code == 0, result.output and picture.is_file()
    result = invoke("plot", trained, trained, "--out", tmp_path / "both")
    assert result.exit_code == 0, result.output
    assert (tmp_path / "both" / "curves.png").is_file()


def test_a_plotting_failure_is_a_warning_and_the_run_succeeds(data, tmp_path, monkeypatch):
    import distill.viz.curves

    def broken(run):
        raise RuntimeError("no fonts")

    monkeypatch.setattr(distill.viz.curves, "write_run_curves", broken)
    run = tmp_path / "run"
    result = invoke("train", "gfl-tiny", "--data", data, "--out", run, "--epochs", 1, *SMALL)
    assert result.exit_code == 0, result.output
    assert "warning:" in result.output and "training curves not drawn (RuntimeError: no fonts)" in result.output
    assert (run / "summary.json").is_file() and not (run / "curves.png").exists()


def test_plot_bad_inputs_are_one_line(tmp_path, trained):
    assert "nope: run folder not found" in one_error_line(invoke("plot", tmp_path / "nope"))
    (tmp_path / "plain").mkdir()
    assert "not a detkd run folder (no run.json)" in one_error_line(invoke("plot", tmp_path / "plain"))
    assert "pass --out DIR" in one_error_line(invoke("plot", trained, trained))
    (tmp_path / "file").write_text("x")
    assert "--out is a file" in one_error_line(invoke("plot", trained, "--out", tmp_path / "file"))
    assert "file: is a file, not a run folder" in one_error_line(invoke("plot", tmp_path / "file"))


# -------------------------------------------------------------------------------------- show
def test_heat_map_paints_the_cells_of_a_literal_mask(tmp_path):
    from matplotlib import colormaps

    from distill.viz.figures import new_figure, png_pixel, save_png
    from distill.viz.show_data import RegionMap
    from distill.viz.show_draw import HEAT_ALPHA, HEAT_CMAP, heat_map, image_axes

    weights = np.zeros(16 + 4, dtype=np.float32)  # level 0: 4x4 at stride 8; level 1: 2x2 at stride 16
    weights[1 * 4 + 2] = 1.0  # level 0, row 1, column 2: x in [16, 24), y in [8, 16)
    weights[16 + 2] = 0.5  # level 1, row 1, column 0
    region = RegionMap("test", weights, [(4, 4), (2, 2)], [8, 16])
    assert region.level(1).tolist() == [[0, 0], [0.5, 0]]
    fig = new_figure(260, 260, layout=None)
    ax = image_axes(fig.add_axes((0.05, 0.05, 0.9, 0.85)), np.zeros((32, 32, 3), dtype=np.uint8), "level 0")
    heat_map(ax, region, 0)
    path = save_png(fig, tmp_path / "heat.png")
    pixels = png(path)
    assert pixels.shape == (260, 260, 3)
    lit = np.round(HEAT_ALPHA * np.array(colormaps[HEAT_CMAP](1.0)[:3]) * 255)  # over a black image
    for x, y in [(20, 12), (16.6, 8.6), (23.4, 15.4)]:  # centre and inner corners of the cell
        col, row = png_pixel(ax, x, y)
        assert np.abs(pixels[row, col] - lit).max() <= 2, (x, y, pixels[row, col], lit)
    for x, y in [(4, 4), (15.4, 12), (24.6, 12), (20, 7.4), (20, 16.6), (28, 28)]:  # other cells stay the image
        col, row = png_pixel(ax, x, y)
        assert pixels[row, col].tolist() == [0, 0, 0], (x, y)


def save_model(path, model, classes, recipe, **meta):
    from distill.checkpoint import save_checkpoint

    save_checkpoint(path, model, {"student": model.config, "classes": classes, "image_size": 64, "recipe": recipe, **meta})
    return path


def test_dense_view_regions_follow_the_grid(data, image_id, tmp_path):
    from distill.data import SCENE_CLASSES
    from distill.viz.show_data import RegionMap, build_view
    from distill.viz.show_draw import shown_levels
    from recipes import load_recipe
    from students import create_student

    torch.manual_seed(0)
    model = create_student("gfl", backbone="resnet10t", num_classes=10, fpn_channels=16, head_convs=1).eval()
    ckpt = save_model(tmp_path / "s.safetensors", model, list(SCENE_CLASSES), load_recipe("ld-tiny").to_dict())
    view = build_view(ckpt, data, image_id)
    assert [r.name for r in view.regions] == ["main", "vlr(gamma=0.25)", "gt_boxes"]  # the recipe's regions
    gt = view.regions[2]
    assert gt.strides == [8, 16, 32, 64, 128] and gt.level_sizes[0] == (8, 8)
    boxes = view.target.boxes
    for i in range(8):  # by hand: a P3 cell is 1 when its centre lies strictly inside a GT box
        for j in range(8):
            x, y = (j + 0.5) * 8, (i + 0.5) * 8
            inside = bool(((x > boxes[:, 0]) & (x < boxes[:, 2]) & (y > boxes[:, 1]) & (y < boxes[:, 3])).any())
            assert gt.level(0)[i, j] == float(inside), (i, j)
    assert view.regions[0].weights.sum() > 0 and view.image.shape == (64, 64, 3)
    assert shown_levels(view.regions) == [l for l in range(5) if any(r.level(l).max() > 0 for r in view.regions)]
    empty = RegionMap("none", np.zeros(20, dtype=np.float32), [(4, 4), (2, 2)], [8, 16])
    assert shown_levels([empty]) == [0]  # nothing anywhere: the first level still shows the image


def test_sparse_view_pairs_link_student_teacher_and_gt(data, image_id, tmp_path):
    from distill.data import SCENE_CLASSES
    from distill.viz.show_data import build_view
    from distill.viz.show_draw import PANEL_PX, draw_view
    from recipes import load_recipe
    from students import create_student

    torch.manual_seed(0)
    tiny = dict(backbone="resnet10t", num_classes=10, strides=[8, 16, 32], fpn_channels=16, num_queries=8, ffn_dim=32, dynamic_dim=8,
                num_heads=4, roi_canonical=48.0)
    student = create_student("asag_s_gen", **tiny).eval()
    teacher = create_student("asag_s", **tiny).eval()
    recipe = load_recipe("asag-kd-tiny").to_dict()
    t_ckpt = save_model(tmp_path / "t.safetensors", teacher, list(SCENE_CLASSES), None)
    s_ckpt = save_model(tmp_path / "s.safetensors", student, list(SCENE_CLASSES), recipe, teacher={"path": str(t_ckpt)})
    view = build_view(s_ckpt, data, image_id)  # the teacher recorded in the checkpoint
    assert view.teacher is not None and view.regions == []
    assert [p.name for p in view.pairs] == ["gt_bridged", "teacher_set(top_k=20)", "shared_queries(top_k=20)"]
    bridged = view.pairs[0]
    assert len(bridged.weight) == len(view.target.boxes)  # one Hungarian match per GT on each side
    assert sorted(map(tuple, bridged.gt.tolist())) == sorted(map(tuple, view.target.boxes.tolist()))
    assert view.anchors is not None and view.anchors.shape[1] == 4 and len(view.anchors) > 0
    path = draw_view(view, tmp_path / "show.png")
    width, height = Image.open(path).size
    assert width == 4 * PANEL_PX and height == 2 * PANEL_PX + 50  # GT, student, teacher, anchors | 3 pair panels


def test_show_cli_and_bad_inputs(trained, data, image_id, tmp_path):
    from distill.viz.show_draw import PANEL_PX

    result = invoke("show", trained, "--data", data, "--image", image_id)
    assert result.exit_code == 0, result.output
    width, height = Image.open(trained / f"show-{image_id}.png").size
    # predictions | main, vlr, gt_boxes over the levels where some region has weight (at least 3 columns)
    assert height == 4 * PANEL_PX + 50 and width % PANEL_PX == 0 and 3 * PANEL_PX <= width <= 5 * PANEL_PX
    line = one_error_line(invoke("show", trained, "--data", data, "--image", 999))
    assert "no image id 999" in line and "[val]" in line
    assert "checkpoint not found" in one_error_line(invoke("show", tmp_path / "nope", "--data", data, "--image", image_id))
    (tmp_path / "x.safetensors").write_text("not a checkpoint")
    assert "x.safetensors" in one_error_line(invoke("show", tmp_path / "x.safetensors", "--data", data, "--image", image_id))
    assert "inside the dataset folder" in one_error_line(invoke("show", trained, "--data", data, "--image", image_id, "--out", data / "x.png"))
    assert "teacher checkpoint or run folder not found" in one_error_line(
        invoke("show", trained, "--data", data, "--image", image_id, "--teacher", tmp_path / "gone"))


# ------------------------------------------------------------------------------------ compare
def summary(ap, **extra):
    return {"recipe": "r", "final": {"AP": ap, "AP50": 2 * ap, "AP75": ap / 2, "AR100": 0.9}, "seconds": 10.0, "train_seconds": 8.0,
            "images_per_s": 12.5, **extra}


def test_compare_gap_closed_by_hand(tmp_path):
    base = fake_run(tmp_path / "alone", [], summary=summary(0.2))
    top = fake_run(tmp_path / "teacher", [], summary=summary(0.5))
    kd = fake_run(tmp_path / "kd", [], kind="distill", summary=summary(0.35, steady_images_per_s=20.0),
                  teacher={"path": str(tmp_path / "teacher" / "checkpoints" / "best.safetensors"), "val": {"AP": 0.4}})
    result = invoke("compare", kd, "--baseline", base, "--teacher", top, "--json", tmp_path / "cmp.json")
    assert result.exit_code == 0, result.output
    rows = {r["run"]: r for r in json.loads((tmp_path / "cmp.json").read_text())["runs"]}
    assert rows["kd"]["gap closed"] == pytest.approx((0.35 - 0.2) / (0.5 - 0.2))  # 0.5
    assert rows["alone"]["gap closed"] == 0.0 and rows["teacher"]["gap closed"] == pytest.approx(1.0)
    assert (rows["alone"]["role"], rows["teacher"]["role"], rows["kd"]["role"]) == ("baseline", "teacher", None)
    assert rows["kd"]["teacher"] == "teacher" and rows["kd"]["images/s"] == 20.0 and rows["alone"]["images/s"] == 12.5
    assert rows["kd"]["AP50"] == 0.7 and rows["kd"]["params"] is None and rows["kd"]["export MB"] is None
    assert "50.0%" in result.output
    # without --teacher: the teacher AP the distill run recorded (0.4): (0.35 - 0.2) / (0.4 - 0.2)
    result = invoke("compare", kd, "--baseline", base, "--json", tmp_path / "cmp2.json")
    rows = {r["run"]: r for r in json.loads((tmp_path / "cmp2.json").read_text())["runs"]}
    assert rows["kd"]["gap closed"] == pytest.approx(0.75) and rows["alone"]["gap closed"] is None


def test_compare_counts_parameters_of_a_real_run(trained):
    from distill.viz.compare import count_parameters
    from students.saved import load_detector

    model, _ = load_detector(trained)
    assert count_parameters(trained) == sum(p.numel() for p in model.parameters())


def test_gap_closed_is_undefined_when_the_teacher_is_not_better():
    from distill.viz.compare import gap_closed

    assert gap_closed(0.3, 0.2, 0.2) is None and gap_closed(0.3, 0.2, None) is None and gap_closed(0.3, 0.2, 0.6) == pytest.approx(0.25)


def test_compare_bad_inputs_are_one_line(tmp_path):
    assert "nope: run folder not found" in one_error_line(invoke("compare", tmp_path / "nope"))
    fake_run(tmp_path / "running", [])
    assert "has no summary.json" in one_error_line(invoke("compare", tmp_path / "running"))
    (tmp_path / "plain").mkdir()
    assert "not a detkd run folder" in one_error_line(invoke("compare", tmp_path / "plain"))
    (tmp_path / "a.json").write_text("{}")
    assert "a.json: is a file, not a run folder" in one_error_line(invoke("compare", tmp_path / "a.json"))
    assert "--json is a folder" in one_error_line(invoke("compare", tmp_path / "running", "--json", tmp_path))
    (tmp_path / "notes.json").write_text("mine")
    fake_run(tmp_path / "done", [], summary=summary(0.1))
    line = one_error_line(invoke("compare", tmp_path / "done", "--json", tmp_path / "notes.json"))
    assert "--json exists and was not written by this command" in line and (tmp_path / "notes.json").read_text() == "mine"
