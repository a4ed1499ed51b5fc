"""The distillation benchmarks' rows. Sparse: each is the distill recipe with one correspondence (and / or
feature mimicking), and fits its teacher. Dense: the recommended recipe is the tuning split's choice;
``--student-epochs`` runs every student on that schedule in folders of its own."""
import importlib.util
import inspect
import sys
from pathlib import Path

import pytest

from distill.engine.run import build_losses
from recipes import load_recipe
from students import create_student, student_entrypoint
from teachers import FrozenTeacher, check_pair

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"


def load_benchmark(name: str = "sparse_gain"):
    sys.path.insert(0, str(BENCHMARKS))
    try:
        spec = importlib.util.spec_from_file_location(name, BENCHMARKS / f"{name}.py")
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        return module
    finally:
        sys.path.remove(str(BENCHMARKS))


bench = load_benchmark()
DISTILLED = [row for row in bench.ROWS if row.teacher is not None]
BY_SLUG = {row.slug: row for row in bench.ROWS}


def build(spec):
    params = {**spec.params, "num_classes": 10}
    if "pretrained" in inspect.signature(student_entrypoint(spec.name)).parameters:
        params["pretrained"] = None
    return create_student(spec.name, **params)


@pytest.mark.parametrize("row", DISTILLED, ids=[row.slug for row in DISTILLED])
def test_every_row_uses_its_own_correspondence_and_fits_its_teacher(row):
    recipe = bench.row_recipe(row, bench.student_sets(bench.PROFILES["quick"], 1, 3))
    assert recipe.train.seed == 3 and recipe.train.epochs == bench.PROFILES["quick"]["student_epochs"]
    if row.losses is None:  # the recipe as shipped: every term of it
        assert recipe.losses == load_recipe(row.recipe).losses
    else:
        assert recipe.losses, "a distilled row distils something"
        predicted = [spec for spec in recipe.losses if spec.name != "feature"]
        assert len({spec.pairer for spec in predicted}) <= 1  # one correspondence per row
        names = {spec.name for spec in predicted}
        crossed = {spec.params.get("part") for spec in predicted if spec.name == "crosskd_query"}
        # class and box knowledge both: KD + box terms, or CrossKD for queries' two parts
        assert not predicted or names >= {"kd", "box"} or (names == {"crosskd_query"} and crossed == {"cls", "box"})
        assert all(spec.pairer == "all" for spec in recipe.losses if spec.name == "feature")  # features: every location
    teacher_name, teacher_sets = bench.TEACHERS[bench.REFINED[row.teacher][0] if row.teacher in bench.REFINED else row.teacher]
    student, teacher = build(recipe.student), FrozenTeacher(build(load_recipe(teacher_name, teacher_sets).student))
    check_pair(student.spec, teacher.spec, build_losses(recipe, student, teacher))


@pytest.mark.parametrize("row", DISTILLED, ids=[row.slug for row in DISTILLED])
def test_every_row_shares_its_baselines_student_and_schedule(row):
    baseline = BY_SLUG[row.baseline]
    assert baseline.teacher is None  # paired with a student alone
    base, recipe = bench.baseline_recipe(bench.row_recipe(baseline, [])), bench.row_recipe(row, [])
    assert recipe.student == base.student and recipe.train == base.train and recipe.data == base.data


def test_refined_teacher_row_differs_from_its_comparison_only_in_the_teacher():
    for slug, other in bench.VERSUS.items():
        row, against = BY_SLUG[slug], BY_SLUG[other]
        assert bench.REFINED[row.teacher][0] == against.teacher
        assert bench.row_recipe(row, []).losses == bench.row_recipe(against, []).losses
        assert (row.recipe, row.overrides, row.baseline) == (against.recipe, against.overrides, against.baseline)


def test_versus_pairs_by_seed_on_every_scored_split():
    run = lambda seed, val, tune: {"seed": seed, "final": {"AP": val}, "tune": {"AP": tune}}  # noqa: E731
    refined = [run(0, 0.30, 0.20), run(1, 0.25, 0.22), run(2, 0.40, 0.10)]
    plain = [run(1, 0.20, 0.22), run(0, 0.31, 0.25)]  # seed 2 has no partner: left out
    result = bench.versus(refined, plain, "plain")
    assert result["row"] == "plain" and "large" not in result
    assert result["val"]["paired_gains"] == pytest.approx([-0.01, 0.05]) and result["val"]["seeds_above"] == 1
    assert result["val"]["mean"] == pytest.approx(0.02)
    assert result["tune"]["paired_gains"] == pytest.approx([-0.05, 0.0]) and result["tune"]["seeds_above"] == 0
    # t(0.975, 1 dof) = 12.7062; std of (-0.01, 0.05) = 0.0424264; interval = mean +- t * std / sqrt(2);
    # rel 1e-4: the literals carry 6 significant digits (rounding <= 5e-6 relative), x20 margin
    low, high = result["val"]["ci95"]
    assert low == pytest.approx(0.02 - 12.7062 * 0.0424264 / 2**0.5, rel=1e-4) and high == pytest.approx(0.02 + 12.7062 * 0.0424264 / 2**0.5, rel=1e-4)


def test_imagenet_rows_distil_into_the_imagenet_student_and_pair_with_it_alone():
    imagenet = [row for row in DISTILLED if row.overrides == bench.IMAGENET]
    assert len(imagenet) >= 5 and {row.baseline for row in imagenet} == {"alone-in"}
    assert {row.baseline for row in DISTILLED if row.overrides == ()} == {"alone"}  # the random-init rows
    pretrained = bench.row_recipe(BY_SLUG["alone-in"], []).student
    assert pretrained.params["pretrained"] == "offline" and pretrained.params["backbone"] == "mobilenetv2_100"
    # otherwise the very student and schedule of the random-init table
    plain = bench.row_recipe(BY_SLUG["alone"], [])
    assert {k: v for k, v in pretrained.params.items() if k not in ("pretrained", "backbone")} == {k: v for k, v in plain.student.params.items() if k != "backbone"}
    assert bench.row_recipe(BY_SLUG["alone-in"], []).train == plain.train


def test_paired_gains_are_taken_against_the_rows_own_student():
    def runs(val):
        return [{"seed": s, "final": {"AP": v, "AP50": v}, "seconds": 1.0, "tune": {"AP": v}} for s, v in enumerate(val)]

    results = {"alone": runs([0.10, 0.12]), "alone-in": runs([0.30, 0.32]), "dab-gt": runs([0.35, 0.36]), "s6-gt": runs([0.11, 0.13])}
    teachers = {slug: {"final": {"AP": 0.5, "AP50": 0.8}, "seconds": 1.0} for slug in ("sparse6", "dab")}
    rows = bench.summarise(teachers, results, bench.ROWS, None)["rows"]
    assert rows["dab-gt"]["paired_gains"] == pytest.approx([0.05, 0.04]) and rows["s6-gt"]["paired_gains"] == pytest.approx([0.01, 0.01])
    # gap closed against its own alone: (0.355 - 0.31) / (0.5 - 0.31)
    assert rows["dab-gt"]["gap_closed"] == pytest.approx(0.045 / 0.19) and rows["dab-gt"]["baseline"] == "alone-in"


def test_feature_and_random_point_rows_run_the_teacher_online_and_the_others_read_its_query_cache():
    for slug in ("dab-feat", "dab-gt-ld-feat", "dab-kddetr"):
        assert bench.needs_online_teacher(bench.row_recipe(BY_SLUG[slug], [])), slug
    for slug in ("dab-shared", "dab-gt-ld", "dab-set", "s6-shared"):
        assert not bench.needs_online_teacher(bench.row_recipe(BY_SLUG[slug], [])), slug


def test_the_recommended_row_is_chosen_on_the_tuning_split_not_on_val():
    # s6-gt wins on val, gfl-gt on the tuning split; s6-set is the 6-stage teacher's best on the tuning split
    def runs(val, tune):
        return [{"seed": s, "final": {"AP": v, "AP50": 2 * v}, "seconds": 1.0, "tune": {"AP": t}} for s, (v, t) in enumerate(zip(val, tune))]

    results = {"alone": runs([0.10, 0.12], [0.20, 0.22]), "s6-gt": runs([0.15, 0.16], [0.19, 0.23]), "gfl-gt": runs([0.11, 0.12], [0.25, 0.26]),
               "s6-set": runs([0.09, 0.10], [0.21, 0.23]), "gfl-set": runs([0.20, 0.20], [0.20, 0.20])}
    teachers = {slug: {"final": {"AP": 0.5, "AP50": 0.8}, "seconds": 1.0} for slug in ("sparse6", "gfl")}
    summary = bench.summarise(teachers, results, bench.ROWS, None)
    assert summary["selected_on_tune"] == {"sparse6": "s6-set", "gfl": "gfl-gt"}
    gfl, s6 = summary["rows"]["gfl-gt"], summary["rows"]["s6-gt"]
    assert gfl["tune_paired_gain_mean"] == pytest.approx(0.045) and gfl["tune_seeds_above_alone"] == 2
    assert s6["tune_paired_gain_mean"] == pytest.approx(0.0) and s6["tune_seeds_above_alone"] == 1
    assert s6["paired_gain_mean"] == pytest.approx(0.045) and gfl["paired_gain_mean"] == pytest.approx(0.005)
    assert gfl["tune_APs"] == [0.25, 0.26]


def test_reuse_links_the_data_teachers_and_caches_only(tmp_path):
    full, long = tmp_path / "full", tmp_path / "long"
    for name in ("data", "data-tune", "teacher-gfl", "cache-sparse6", "alone-s0", "claims"):
        (full / name).mkdir(parents=True)
    (full / "teacher-gfl" / "summary.json").write_text("{}")
    long.mkdir()
    bench.link_shared(long, full)
    bench.link_shared(long, full)  # again (another process, a resumed call): nothing changes
    assert sorted(p.name for p in long.iterdir()) == ["cache-sparse6", "data", "data-tune", "teacher-gfl"]
    assert all((long / p).is_symlink() for p in ("data", "teacher-gfl"))
    assert (long / "teacher-gfl" / "summary.json").read_text() == "{}"  # the full profile's teacher, not a copy


def test_the_shipped_recipes_are_the_rows_chosen_on_the_tuning_split():
    # benchmarks/records/sparse_gain-long.json: the recipes' own 16-epoch schedule; its choice per
    # teacher is what asag-distill-sparse6 / asag-distill-gfl ship (README, sparse distillation)
    import json

    # and sparse_gain-long-featscan.json, the later scan of the GFL row's feature weight, overrides its GFL choice
    chosen = {}
    for name in ("sparse_gain-long.json", "sparse_gain-long-featscan.json"):
        record = json.loads((BENCHMARKS / "records" / name).read_text())
        assert record["profile"] == "long" and record["settings"]["student_epochs"] == load_recipe("asag-distill-gfl").train.epochs
        chosen.update(record["selected_on_tune"])
    assert set(chosen) == {"sparse6", "gfl"}
    shipped = {"sparse6": "asag-distill-sparse6", "gfl": "asag-distill-gfl"}
    for teacher_slug, slug in chosen.items():
        assert BY_SLUG[slug].teacher == teacher_slug
        assert load_recipe(shipped[teacher_slug]).losses == bench.row_recipe(BY_SLUG[slug], []).losses, slug


def test_the_larger_report_split_is_paired_by_seed_and_never_selects():
    def runs(val, tune, large):
        return [{"seed": s, "final": {"AP": v, "AP50": v}, "seconds": 1.0, "tune": {"AP": t}, "large": {"AP": g}}
                for s, (v, t, g) in enumerate(zip(val, tune, large))]

    results = {"alone": runs([0.10, 0.12], [0.20, 0.22], [0.15, 0.17]), "gfl-gt": runs([0.11, 0.12], [0.25, 0.26], [0.16, 0.16]),
               "gfl-set": runs([0.11, 0.12], [0.21, 0.22], [0.30, 0.30])}
    teachers = {slug: {"final": {"AP": 0.5, "AP50": 0.8}, "seconds": 1.0} for slug in ("sparse6", "gfl")}
    summary = bench.summarise(teachers, results, bench.ROWS, None)
    row = summary["rows"]["gfl-gt"]
    assert row["large_paired_gains"] == pytest.approx([0.01, -0.01]) and row["large_paired_gain_mean"] == pytest.approx(0.0)
    assert summary["rows"]["alone"]["large_AP_mean"] == pytest.approx(0.16) and "large_paired_gains" not in summary["rows"]["alone"]
    assert summary["selected_on_tune"] == {"gfl": "gfl-gt"}  # gfl-set's large-split lead does not choose it
    summary["settings"] = {"large_val": 500}
    table = bench.markdown_table(summary)
    assert "larger report split (500 images)" in table and "| `gfl-gt` | 0.160 ± 0.000 | 0.160 / 0.160 | +0.000 ± 0.014 | [-0.127, +0.127] | 1/2 |" in table


def test_the_gain_interval_is_students_t_on_the_paired_gains():
    # mean 0.02, std 0.01, n 3: half-width t(0.975, 2) * 0.01 / sqrt(3) = 4.3027 * 0.005774 = 0.02484
    # (fp64; abs 1e-5 is the 5-digit literals' precision: they are off by ≤ 1.6e-6)
    low, high = bench.gain_interval([0.01, 0.02, 0.03])
    assert low == pytest.approx(-0.00484, abs=1e-5) and high == pytest.approx(0.04484, abs=1e-5)
    assert bench.gain_interval([0.02, 0.03, 0.04])[0] == pytest.approx(0.00516, abs=1e-5)  # the same spread above 0: excludes it
    assert bench.gain_interval([0.05]) is None  # one seed has no spread


@pytest.mark.parametrize("slug", sorted(bench.SAME_STEP))
def test_rows_sharing_a_step_cost_differ_only_in_loss_weights(slug):
    mine, timed = BY_SLUG[slug].losses, BY_SLUG[bench.SAME_STEP[slug]].losses
    strip = lambda losses: [{k: v for k, v in loss.items() if k != "weight"} for loss in losses]  # noqa: E731
    assert strip(mine) == strip(timed) and [l["weight"] for l in mine] != [l["weight"] for l in timed]


def test_asag_distill_dab_is_the_row_the_dab_record_chose_on_the_tuning_split():
    import json

    record = json.loads((BENCHMARKS / "records" / "sparse_gain-dab-long-5seeds.json").read_text())
    assert record["profile"] == "long" and record["settings"]["student_epochs"] == load_recipe("asag-distill-dab").train.epochs
    chosen = record["selected_on_tune"]["dab"]
    row = BY_SLUG[chosen]
    assert row.teacher == "dab" and row.overrides == ()  # the random-init student of the record
    shipped = load_recipe("asag-distill-dab")
    assert shipped.losses == bench.row_recipe(row, []).losses and shipped.student == bench.row_recipe(row, []).student
    # the record's paired gain is the README's headline: beyond zero on every seed
    assert record["rows"][chosen]["seeds_above_alone"] == 5 and record["rows"][chosen]["paired_gain_ci95"][0] > 0


# the dense records and the recipe each one's tuning split chose: the recommended one on the scenes
# (both scans), the light CrossKD + PKD on the clutter data
DENSE_CHOICES = [
    ("distill_gain-scenes-pretrained.json", "scenes", "pkd"),
    ("distill_gain-scenes-crosskd-variants.json", "scenes", "pkd"),
    ("distill_gain-clutter-crosskd-variants.json", "clutter", "crosskd-pkd-light"),
    # the student on the teacher's 24 epochs: the same choice on both datasets
    ("distill_gain-scenes-e24.json", "scenes", "crosskd-pkd-long"),
    ("distill_gain-clutter-e24.json", "clutter", "crosskd-pkd-long"),
]


@pytest.mark.parametrize(("name", "dataset", "shipped"), DENSE_CHOICES)
def test_the_shipped_dense_recipes_are_the_rows_the_distill_gain_records_chose_on_the_tuning_split(name, dataset, shipped):
    import json

    record = json.loads((BENCHMARKS / "records" / name).read_text())
    gain = load_benchmark("distill_gain")
    rows = {row.name: row for row in gain.VARIANTS}
    chosen = record["selected_on_tune"]
    tune = {name: row["tune_paired_gain_mean"] for name, row in record["rows"].items() if row.get("tune_paired_gain_mean") is not None}
    assert chosen == max(tune, key=tune.get)  # chosen on the tuning split, whatever val says
    assert record["settings"]["dataset"] == dataset
    assert load_recipe(shipped).losses == load_recipe(rows[chosen].recipe, list(rows[chosen].overrides)).losses
    assert record["settings"]["student_epochs"] == load_recipe(shipped).train.epochs
    assert all(gain > 0 for gain in record["rows"][chosen]["paired_gains"])  # the README's "every seed"


def test_the_recommended_dense_recipe_is_served_by_a_default_teacher_cache():
    # what `detkd cache` without --recipe builds: feature rows at every location
    from distill.regions import create_region
    from recipes import RECOMMENDED
    from teachers.cache_select import spec_from_recipe

    assert DENSE_CHOICES[0][2] == RECOMMENDED
    cached = spec_from_recipe(load_recipe(RECOMMENDED))
    assert cached.head_regions == () and cached.feature_regions == (create_region("all"),)


def test_student_epochs_runs_every_student_on_that_schedule_in_folders_of_its_own(tmp_path, monkeypatch):
    import json

    gain = load_benchmark("distill_gain")
    seen = {}

    def fake_train_all(out, profile, variants, threads, student_sets, reuse=None):
        seen.update(profile, variants=[row.slug for row in variants])
        run = {"seed": 0, "final": {"AP": 0.3, "AP50": 0.5}, "tune": {"AP": 0.35}}
        return {"teacher": {"best_AP": 0.5, "final": {"AP": 0.5, "AP50": 0.7}}, "runs": {gain.BASELINE.name: [run]}}

    monkeypatch.setattr(gain, "train_all", fake_train_all)
    gain.main(["--out", str(tmp_path), "--no-cost", "--only", "gfl-student", "--seeds", "0", "--student-epochs", "24"])
    assert seen["student_epochs"] == 24 and seen["variants"] == ["gfl-student"]
    assert gain.run_folder(tmp_path, gain.BASELINE, 0, seen) == tmp_path / "gfl-student-e24-s0"
    assert gain.run_folder(tmp_path, gain.BASELINE, 0, gain.PROFILES["full"]) == tmp_path / "gfl-student-s0"  # the 12-epoch runs keep their names
    record = json.loads((tmp_path / "distill_gain-e24.json").read_text())
    assert record["settings"]["student_epochs"] == 24 and not (tmp_path / "distill_gain.json").exists()


def test_leaf_predictions_cut_the_crossing_state_off_the_students_graph():
    # the cost tables time a row's terms alone, repeatedly, between optimizer steps: every tensor a term
    # differentiates must be a leaf, or the second backward meets parameters the optimizer changed in place
    import torch

    from students.sparse.detector import QueryCrossing, SparsePredictions

    weight = torch.ones(2, requires_grad=True)
    content = torch.ones(1, 3, 2) * weight
    valid = torch.ones(1, 3, dtype=torch.bool)
    preds = SparsePredictions(torch.zeros(1, 3, 1) * weight.sum(), torch.zeros(1, 3, 4), valid,
                              crossing=QueryCrossing(content, torch.zeros(1, 3, 4), valid))
    common = load_benchmark("common")
    leaf = common.leaf_predictions(preds)
    assert leaf.crossing.content.is_leaf and leaf.crossing.content.requires_grad and leaf.logits.is_leaf
    assert torch.equal(leaf.crossing.content, content) and leaf.crossing.valid is valid
