"""Teacher cache: exact rows for every loss and region, fingerprints, checksums, resume, variants, CLI.

Tolerances (tests/tolerances.py): the cache stores the teacher's rows in fp16 (u16 = 2^-11 ≈ 4.9e-4
relative per value), computed by the build on another batch size than the online teacher here, i.e.
by other fp32 kernels (≤ ``FP32_NETWORK`` ≈ 1.2e-4 apart, far below one fp16 ulp of 2^-10 ≈ 9.8e-4).

* Rows: a cached value and the online value rounded to fp16 are then equal or adjacent fp16 numbers:
  ≤ one fp16 ulp ≤ 2^-10 |x| ≤ rtol 1e-3 |x| (atol 2e-3 covers |x| < 2 and subnormals).
* Losses on fp16 rows vs the fp32 online teacher, rel 2e-3 ≈ 4 · u16: a loss whose relative condition
  in its teacher inputs is ≤ 4 (weighted means of T²-scaled KLs, relative squared errors, L1 / GIoU of
  boxes decoded from the bins). Not a worst-case proof: the rounding errors of the ≥ 100 rows a loss
  averages have independent signs and mostly cancel (measured ≤ 1e-4 on this seeded fixture, an fp16
  effect that itself does not depend on the CPU).
* ``pkd`` standardises the teacher's maps per channel, which scales a value's fp16 rounding by
  |t - mean| / std and |mean| / std (≤ 5 on this fixture's teacher): its worst case is above 4 · u16,
  and the same rel 2e-3 rests on the cancellation above (measured ≤ 6e-5 over every region and flip
  here, 4e-6 for the CLI run's first step), a margin of 30x or more.
"""
import dataclasses
import json
import shutil

import pytest
import torch
from cli_helpers import invoke, one_error_line

import distill
from distill.checkpoint import save_checkpoint
from distill.cli.cache_cmd import parse_regions
from distill.data import DetectionTransform, build_loader, collate, generate_scenes, load_dataset, set_epoch
from distill.errors import CheckpointError, DataError
from distill.losses import DistillInputs
from distill.regions import create_region
from students import create_student
from teachers import CacheMissError, CacheSpec, TeacherCache, build_cache, load_teacher

SIZE = 64
SMALL = ["--set", f"data.image_size={SIZE}", "--set", "train.batch_size=4", "--no-progress"]
SELECTED = (create_region("main"), create_region("vlr"), create_region("gt_boxes"))
ALL = (create_region("all"),)


def make_teacher(path, classes, seed=0, channels=16):
    """A random GFL saved as a teacher checkpoint; head weights spread so logits differ per location."""
    torch.manual_seed(seed)
    model = create_student("gfl", backbone="resnet10t", num_classes=len(classes), fpn_channels=channels, head_convs=1)
    with torch.no_grad():
        for p in model.dense_head.parameters():
            p.add_(torch.randn_like(p) * 0.3)
    save_checkpoint(path, model, {"student": model.config, "classes": list(classes), "image_size": SIZE})
    return path


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    root = tmp_path_factory.mktemp("cache")
    generate_scenes(root / "data", num_train=8, num_val=4, size=SIZE, seed=1)
    generate_scenes(root / "other_data", num_train=8, num_val=4, size=SIZE, seed=2)
    train = load_dataset(root / "data", "train", DetectionTransform(SIZE))
    make_teacher(root / "teacher.safetensors", train.classes)
    make_teacher(root / "other_teacher.safetensors", train.classes, seed=5)
    return root


@pytest.fixture(scope="module")
def train_set(root):
    return load_dataset(root / "data", "train", DetectionTransform(SIZE, hflip_prob=0.5))


@pytest.fixture(scope="module")
def teacher(root):
    return load_teacher(root / "teacher.safetensors")


@pytest.fixture(scope="module")
def caches(root, teacher, train_set):
    """A selection cache (main, vlr, gt_boxes) and a dense one, both parts, both variants, 3 shards."""
    for name, regions in (("selected", SELECTED), ("dense", ALL)):
        build_cache(teacher, train_set, root / name, CacheSpec(head_regions=regions, feature_regions=regions), shard_size=3, batch_size=2, matcher=MATCHER, show_progress=False)
    return {"selected": TeacherCache.open(root / "selected"), "dense": TeacherCache.open(root / "dense")}


# The student whose own ATSS assignment selects the cached locations (build_cache's matcher).
MATCHER = create_student("gfl", backbone="resnet10t", num_classes=10, fpn_channels=8, head_convs=1)


def student_side(batch, channels=8):
    torch.manual_seed(1)
    student = create_student("gfl", backbone="resnet10t", num_classes=10, fpn_channels=channels, head_convs=1)
    features = student.features(batch.images)
    outputs = student.head(features, batch.image_sizes)
    _, matches = student.loss(outputs, batch.targets, batch.image_sizes)
    return DistillInputs(student.spec, outputs, features, matches, batch.image_sizes)


def online(teacher, batch) -> DistillInputs:
    return teacher.inputs(batch, None, frozenset({"head", "features"}))


def fp16_rounded(t_in: DistillInputs) -> DistillInputs:
    p = t_in.predictions
    bins = dataclasses.replace(p.bins, logits=p.bins.logits.half().float())
    rounded = dataclasses.replace(p, logits=p.logits.half().float(), bins=bins)
    return DistillInputs(t_in.spec, rounded, [f.half().float() for f in t_in.features], None, t_in.image_sizes)


def rows(select):
    """(B, N) bool -> the (image, index) columns of its True entries, batch-major."""
    return select.nonzero(as_tuple=True)


ADAPTED = {"student_channels": 8, "teacher_channels": 16}
LOSS_PARAMS = {
    "kd": [{}, {"legacy": True}, {"mode": "softmax"}], "ld": [{}, {"legacy": True}], "box": [{}],
    "feature": [ADAPTED, {**ADAPTED, "relative": False}, {**ADAPTED, "legacy": True}],
    "pkd": [ADAPTED],  # whole maps, rebuilt from the dense cache's rows, whatever region it pairs on
}


@pytest.mark.parametrize("flips", [(False,) * 4, (True,) * 4, (False, True, True, False)], ids=["none", "hflip", "mixed"])
def test_losses_from_the_cache_equal_the_online_teacher(caches, teacher, train_set, flips):
    canvas = caches["selected"].canvas
    batch = collate([train_set.get(i, f) for i, f in enumerate(flips)], pad_to=canvas)
    s_in = student_side(batch)
    t_online = online(teacher, batch)
    rounded = fp16_rounded(t_online)
    # every loss a cache can serve (crosskd refuses one: test_losses_a_cache_cannot_serve_are_refused)
    assert set(LOSS_PARAMS) == {n for n in distill.list_losses() if distill.create_loss(n).cache_refusal is None}
    # one teacher side per cache for the whole batch, as the engine serves a step's losses
    served = {kind: cache.inputs(batch, s_in, frozenset({"head", "features"})) for kind, cache in caches.items()}
    for name in LOSS_PARAMS:
        for region in distill.list_regions():
            for params in LOSS_PARAMS[name]:
                loss = distill.create_loss(name, pairer=region, **params)
                cached = served["dense" if region == "all" or loss.whole_maps else "selected"]
                pairs = loss.pairer(s_in, cached, batch.targets, loss.space)
                assert len(pairs) > 0, region
                where = f"{name} {params} region {region}"
                value = loss(s_in, cached, pairs)
                assert value.requires_grad and float(value.detach()) > 0, where  # reaches the student
                value, expected = float(value.detach()), float(loss(s_in, t_online, pairs).detach())
                assert value == pytest.approx(expected, rel=2e-3), where  # fp16 storage (module docstring)
                # the same fp16 logits / features up to rare one-ulp neighbours (other build kernels); the cache's
                # boxes are decoded from fp16 bins while `rounded` keeps fp32 boxes (measured ≤ 7.8e-5, box / main)
                assert value == pytest.approx(float(loss(s_in, rounded, pairs).detach()), rel=2e-4, abs=1e-7), where


def test_rows_are_the_teachers_rows_rounded_to_fp16(caches, teacher, train_set):
    batch = collate([train_set.get(i, i % 2 == 1) for i in range(4)], pad_to=caches["dense"].canvas)
    s_in = student_side(batch)
    t_in = online(teacher, batch)
    t_features, t_outputs = t_in.features, t_in.predictions
    cached = caches["dense"].inputs(batch, s_in, frozenset({"head", "features"}))
    select = s_in.predictions.valid
    torch.testing.assert_close(cached.cls_rows(*rows(select)), t_outputs.logits[select].half().float(), atol=2e-3, rtol=1e-3)
    torch.testing.assert_close(cached.bin_rows(*rows(select)), t_outputs.bin_logits[select].half().float(), atol=2e-3, rtol=1e-3)
    # rows: one fp16 ulp (module docstring). Boxes are decoded from the cached bins in the grid's frame: the
    # teacher's boxes up to fp16 bins (E = Σ k p_k moves by ≤ 8 bins · max |Δ logit|, times the stride)
    torch.testing.assert_close(cached.box_rows(*rows(select)), t_outputs.boxes[select], atol=0.1, rtol=1e-3)
    level0 = select[:, : t_features[0].shape[-2] * t_features[0].shape[-1]]
    expected = t_features[0].flatten(2).transpose(1, 2)[level0].half().float()
    torch.testing.assert_close(cached.feature_rows(0, *rows(level0)), expected, atol=2e-3, rtol=1e-3)
    assert cached.spec.num_classes == 10 and cached.spec.bins == 17 and cached.spec.family == "dense"


def test_class_mapping_is_stored_like_the_online_teacher(root, train_set, tmp_path):
    mapped = load_teacher(root / "teacher.safetensors")
    mapped.class_index = torch.tensor([3, 1, 4, 0, 2, 9, 8, 7, 6, 5])
    build_cache(mapped, train_set, tmp_path / "c", CacheSpec(head_regions=ALL), matcher=MATCHER, show_progress=False)
    cache = TeacherCache.open(tmp_path / "c")
    batch = collate([train_set.get(i, False) for i in range(2)], pad_to=cache.canvas)
    s_in = student_side(batch)
    t_outputs = online(mapped, batch).predictions
    select = s_in.predictions.valid
    # one fp16 ulp of tolerance: the build ran the teacher on another batch size, whose fp32 sums may
    # round to the neighbouring fp16 value
    torch.testing.assert_close(cache.inputs(batch, s_in).cls_rows(*rows(select)), t_outputs.logits[select].half().float(), atol=2e-3, rtol=1e-3)
    assert cache.fingerprint["teacher"]["class_index"] == [3, 1, 4, 0, 2, 9, 8, 7, 6, 5]
    with pytest.raises(CheckpointError, match="another teacher.*class_index"):
        cache.check_run(load_teacher(root / "teacher.safetensors"), train_set, [], 32, MATCHER)


def test_a_region_the_cache_does_not_hold_is_a_clear_error(caches, teacher, train_set):
    cache = caches["selected"]
    batch = collate([train_set.get(i, False) for i in range(2)], pad_to=cache.canvas)
    s_in = student_side(batch)
    loss = distill.create_loss("kd", pairer="all")
    pairs = loss.pairer(s_in, None, batch.targets, loss.space)
    with pytest.raises(CacheMissError, match=r"image id \d+ \(none\) at level \d row \d+ col \d+.*gt_boxes, main, vlr.*--dense"):
        loss(s_in, cache.inputs(batch, s_in), pairs)
    with pytest.raises(CheckpointError, match=r"loss 'kd' reads teacher head in region all, but the cache holds head rows for gt_boxes, main, vlr"):
        cache.check_run(teacher, train_set, [loss], 32, MATCHER)
    spelled_out = distill.create_loss("ld", pairer="vlr", pairer_params={"gamma": 0.25})
    other_gamma = distill.create_loss("ld", pairer="vlr", pairer_params={"gamma": 0.5})
    cache.check_run(teacher, train_set, [spelled_out], 32, MATCHER)  # defaults spelled out
    with pytest.raises(CheckpointError, match="region vlr.*gamma"):
        cache.check_run(teacher, train_set, [other_gamma], 32, MATCHER)
    caches["dense"].check_run(teacher, train_set, [loss], 32, MATCHER)  # 'all' covers every region


def test_losses_a_cache_cannot_serve_are_refused(caches, teacher, train_set):
    loss = distill.create_loss("crosskd", pairer="all")
    with pytest.raises(CheckpointError, match=r"loss 'crosskd' runs the teacher's head on the student's own maps.*; distil without --cache"):
        caches["dense"].check_run(teacher, train_set, [loss], 32, MATCHER)


def test_pkd_needs_every_valid_feature_row_whatever_its_pairer_selects(caches, teacher, train_set):
    # the selected cache holds features at gt_boxes / main / vlr: enough for `feature` on main, not for pkd on main
    cache = caches["selected"]
    pkd, feature = (distill.create_loss(name, pairer="main", **ADAPTED) for name in ("pkd", "feature"))
    cache.check_run(teacher, train_set, [feature], 32, MATCHER)
    with pytest.raises(CheckpointError, match=r"loss 'pkd' reads teacher features in region all \(whole maps\), but the cache holds features rows for gt_boxes, main, vlr\(.*\) only"):
        cache.check_run(teacher, train_set, [pkd], 32, MATCHER)
    caches["dense"].check_run(teacher, train_set, [pkd], 32, MATCHER)
    batch = collate([train_set.get(i, False) for i in range(2)], pad_to=cache.canvas)
    s_in = student_side(batch)
    with pytest.raises(CacheMissError, match=r"no cached teacher feature row for image id \d+ \(none\) at level 0 row 0 col 0"):
        cache.inputs(batch, s_in, frozenset({"features"})).require_features()


def test_whole_maps_rebuilt_from_cached_rows_on_a_literal_case():
    """One 2x2 level at stride 8 (centres 4 and 12) of a 16 x 8 (h x w) image: column 1 (x = 12) is
    padding. Rows cached at locations 0 (row 0 col 0) and 2 (row 1 col 0)."""
    from distill.structures import DetectorSpec
    from teachers import CachedTeacherInputs

    def side(index):
        return CachedTeacherInputs(
            spec=DetectorSpec("dense", 1, (8,), 2, None), image_sizes=torch.tensor([[16, 8]]),
            points=torch.tensor([[4.0, 4.0], [12.0, 4.0], [4.0, 12.0], [12.0, 12.0]]), strides=torch.full((4,), 8.0),
            level_sizes=[(2, 2)], keys=[(7, False)], source="literal", held={"feature": "main"},
            feat_index=torch.tensor([index]), feat=torch.tensor([[1.0, 2.0], [3.0, 4.0]]),
        )

    maps = side([0, -1, 1, -1]).require_features()
    assert len(maps) == 1 and torch.equal(maps[0], torch.tensor([[[[1.0, 0.0], [3.0, 0.0]], [[2.0, 0.0], [4.0, 0.0]]]]))
    with pytest.raises(CacheMissError, match=r"image id 7 \(none\) at level 0 row 1 col 0; the cache holds feature rows for main only"):
        side([0, -1, -1, 1]).require_features()  # location 2 is valid but not cached (3 is padding)


def test_other_teacher_data_or_transform_are_refused(root, caches, train_set):
    cache = caches["selected"]
    with pytest.raises(CheckpointError, match="another teacher .teacher.weights_sha256"):
        cache.check_run(load_teacher(root / "other_teacher.safetensors"), train_set, [], 32, MATCHER)
    teacher = load_teacher(root / "teacher.safetensors")
    other = load_dataset(root / "other_data", "train", DetectionTransform(SIZE))
    with pytest.raises(CheckpointError, match="other training data .data.annotations_sha256"):
        cache.check_run(teacher, other, [], 32, MATCHER)
    resized = load_dataset(root / "data", "train", DetectionTransform(96))
    with pytest.raises(CheckpointError, match="another input transform .input.canvas"):
        cache.check_run(teacher, resized, [], 32, MATCHER)


def copy_cache(caches, tmp_path):
    return shutil.copytree(caches["selected"].folder, tmp_path / "copy")


def test_a_corrupted_shard_is_found_and_named(caches, tmp_path):
    folder = copy_cache(caches, tmp_path)
    shard = folder / "shard-00001.safetensors"
    data = bytearray(shard.read_bytes())
    data[len(data) // 2] ^= 0x01
    shard.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match=r"shard-00001\.safetensors: cache shard checksum mismatch"):
        TeacherCache.open(folder)
    lazy = TeacherCache.open(folder, verify=False)  # sizes only; each shard's sha256 before first use
    lazy.rows(lazy.manifest["image_ids"][0], False)
    with pytest.raises(CheckpointError, match=r"shard-00001\.safetensors: cache shard checksum mismatch"):
        lazy.rows(lazy.manifest["image_ids"][3], False)


def test_a_truncated_or_missing_shard_is_named(caches, tmp_path):
    folder = copy_cache(caches, tmp_path)
    shard = folder / "shard-00002.safetensors"
    shard.write_bytes(shard.read_bytes()[:-10])
    with pytest.raises(CheckpointError, match=r"shard-00002\.safetensors: cache shard is \d+ bytes, the manifest says \d+ \(truncated"):
        TeacherCache.open(folder, verify=False)
    shard.unlink()
    with pytest.raises(CheckpointError, match=r"shard-00002\.safetensors: cache shard is missing"):
        TeacherCache.open(folder)
    (folder / "manifest.json").write_text("{")
    with pytest.raises(CheckpointError, match="unreadable cache manifest"):
        TeacherCache.open(folder)


def test_an_interrupted_build_resumes_to_the_same_bytes(root, teacher, train_set, tmp_path):
    spec = CacheSpec(head_regions=SELECTED, feature_regions=(create_region("gt_boxes"),))
    build_cache(teacher, train_set, tmp_path / "whole", spec, shard_size=3, batch_size=2, matcher=MATCHER, show_progress=False)

    def stop_after_first(k, record):
        if k == 0:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        build_cache(teacher, train_set, tmp_path / "resumed", spec, shard_size=3, batch_size=2, matcher=MATCHER, show_progress=False, on_shard=stop_after_first)
    assert sorted(p.name for p in (tmp_path / "resumed").iterdir()) == ["manifest.json", "shard-00000.safetensors"]
    with pytest.raises(CheckpointError, match=r"incomplete \(1/3 shards\); rerun"):
        TeacherCache.open(tmp_path / "resumed")
    (tmp_path / "resumed" / ".shard-00001.safetensors.x1.tmp").write_bytes(b"half a shard")  # a killed write
    summary = build_cache(teacher, train_set, tmp_path / "resumed", spec, matcher=MATCHER, show_progress=False)
    assert summary["resumed_at_shard"] == 1 and summary["built_entries"] == 10  # images 3..7, both variants
    names = sorted(p.name for p in (tmp_path / "whole").iterdir() if p.name != "summary.json")
    assert names == sorted(p.name for p in (tmp_path / "resumed").iterdir() if p.name != "summary.json")
    for name in names:  # same process, same batches (the manifest's), so the same kernels: the same bytes
        assert (tmp_path / "whole" / name).read_bytes() == (tmp_path / "resumed" / name).read_bytes(), name
    assert build_cache(teacher, train_set, tmp_path / "resumed", spec, matcher=MATCHER, show_progress=False)["already_complete"]

    with pytest.raises(CheckpointError, match="another fingerprint .selection.features"):
        build_cache(teacher, train_set, tmp_path / "resumed", CacheSpec(head_regions=SELECTED), matcher=MATCHER, show_progress=False)
    with pytest.raises(CheckpointError, match="shard_size 3"):
        build_cache(teacher, train_set, tmp_path / "resumed", spec, shard_size=4, matcher=MATCHER, show_progress=False)


def test_training_draws_only_cached_variants(root, teacher, tmp_path):
    no_flip = load_dataset(root / "data", "train", DetectionTransform(SIZE, hflip_prob=0.0))
    build_cache(teacher, no_flip, tmp_path / "c", CacheSpec(variants=("none",), head_regions=SELECTED), matcher=MATCHER, show_progress=False)
    cache = TeacherCache.open(tmp_path / "c")
    flipping = load_dataset(root / "data", "train", DetectionTransform(SIZE, hflip_prob=0.5))
    with pytest.raises(CheckpointError, match=r"draws variant hflip \(data.hflip_prob 0.5\).*--set data.hflip_prob=0"):
        cache.check_run(teacher, flipping, [], 32, MATCHER)
    cache.check_run(teacher, no_flip, [], 32, MATCHER)
    loader = build_loader(cache.training_set(no_flip), batch_size=4, shuffle=True, seed=0)
    for epoch in range(3):
        set_epoch(loader, epoch)
        for batch in loader:
            assert not batch.flipped.any() and batch.images.shape[-2:] == cache.canvas
    with pytest.raises(DataError, match="drawn flipped, but the cache holds variants none only"):
        [cache.training_set(flipping)[i] for i in range(len(flipping))]


def test_both_variants_are_drawn_and_served(root, caches, teacher, train_set):
    cache = caches["selected"]
    cache.check_run(teacher, train_set, [], 32, MATCHER)
    flip_only = load_dataset(root / "data", "train", DetectionTransform(SIZE, hflip_prob=1.0))
    cache.check_run(teacher, flip_only, [], 32, MATCHER)  # every draw is cached
    loader = build_loader(cache.training_set(train_set), batch_size=4, shuffle=True, seed=0)
    seen = set()
    for epoch in range(3):
        set_epoch(loader, epoch)
        for batch in loader:
            seen |= set(batch.flipped.tolist())
            s_in = student_side(batch)
            cache.inputs(batch, s_in, frozenset({"head", "features"})).cls_rows(*rows(s_in.matches.positive_mask(s_in.predictions.num_predictions)))
    assert seen == {False, True}


def test_parse_regions_reads_printed_regions():
    assert parse_regions("main, vlr(gamma=0.5, metric='diou_iof_legacy'),gt_boxes") == (
        create_region("main"), create_region("vlr", gamma=0.5, metric="diou_iof_legacy"), create_region("gt_boxes"))
    with pytest.raises(distill.errors.ConfigError, match="unknown distillation region 'nope'"):
        parse_regions("main,nope")


# ----------------------------------------------------------------------------------------- CLI
@pytest.fixture(scope="module")
def cli_cache(root):
    """The ld-tiny cache of a gfl-tiny-sized teacher, built through the CLI."""
    train = load_dataset(root / "data", "train", DetectionTransform(SIZE))
    make_teacher(root / "tiny_teacher.safetensors", train.classes, seed=3, channels=32)
    out = root / "cli_cache"
    result = invoke("cache", root / "tiny_teacher.safetensors", "--data", root / "data", "--out", out, "--recipe", "ld-tiny", *SMALL[:2], "--shard-size", 4, "--no-progress")
    assert result.exit_code == 0, result.output
    assert "fraction of dense" in result.output
    return out


@pytest.mark.parametrize("recipe, head, served", [
    # no --recipe: what the recommended pkd reads, the feature rows of every valid location, no head rows
    (None, [], ["pkd", "pkd-demo"]),
    # LD + KD on main, LD on vlr(gamma 0.25, diou), features on every location: every shipped dense recipe
    # reads main / vlr(gamma 0.25, diou) head rows and all / gt_boxes features (pkd: whole maps = all)
    ("ld-full-feat", ["main", "vlr"], ["ld-full", "ld-full-feat", "ld-main", "ld-main-kd", "ld-pkd", "ld-tiny", "pkd", "pkd-demo"]),
])
def test_cache_holds_what_the_recipe_reads_and_names_the_recipes_it_serves(root, tmp_path, recipe, head, served):
    out = tmp_path / "default"
    chosen = ["--recipe", recipe, *SMALL[:2]] if recipe else []
    result = invoke("cache", root / "teacher.safetensors", "--data", root / "data", "--out", out, *chosen, "--shard-size", 8, "--no-progress")
    assert result.exit_code == 0, result.output
    selection = json.loads((out / "manifest.json").read_text())["fingerprint"]["selection"]
    assert [r["name"] for r in selection["head"]] == head and [r["name"] for r in selection["features"]] == ["all"]
    line = " ".join(result.output.split())
    assert line.split(" serves ", 1)[1].split(":", 1)[0].split(", ") == served


def test_serves_needs_every_region_flip_and_kind():
    from recipes import load_recipe
    from teachers.cache_select import CacheSpec, serves

    main_only = CacheSpec(("none", "hflip"), (create_region("main"),), ())
    assert serves(main_only, load_recipe("ld-main")) and not serves(main_only, load_recipe("ld-full"))  # no vlr rows
    assert not serves(CacheSpec(("none",), (create_region("main"),), ()), load_recipe("ld-main"))  # ld-main flips images
    assert not serves(CacheSpec(("none", "hflip"), queries=True, head_regions=(), feature_regions=()), load_recipe("ld-main"))
    assert serves(CacheSpec(("none", "hflip"), queries=True, head_regions=(), feature_regions=()), load_recipe("asag-kd-tiny"))


def distill_args(root, cache, teacher="tiny_teacher.safetensors", data="data"):
    return ["distill", "ld-tiny", "--teacher", root / teacher, "--data", root / data, "--cache", cache, "--force", "--epochs", 1, *SMALL]


def test_cli_cache_then_distill_matches_the_online_teacher(root, cli_cache):
    manifest = json.loads((cli_cache / "manifest.json").read_text())
    assert manifest["fingerprint"]["variants"] == ["none", "hflip"] and manifest["complete"]
    assert [r["name"] for r in manifest["fingerprint"]["selection"]["head"]] == ["main", "vlr"]
    assert [r["name"] for r in manifest["fingerprint"]["selection"]["features"]] == ["gt_boxes"]
    assert json.loads((cli_cache / "summary.json").read_text())["fraction_of_dense"] < 1

    runs = {}
    for name, extra in (("cached", []), ("online", None)):
        args = distill_args(root, cli_cache)
        if extra is None:
            args = [a for a in args if a != cli_cache and a != "--cache"]
        result = invoke(*args, "--out", root / name)
        assert result.exit_code == 0, result.output
        runs[name] = [json.loads(line) for line in (root / name / "metrics.jsonl").read_text().splitlines() if '"loss"' in line]
    assert len(runs["cached"]) == 2
    first_cached, first_online = runs["cached"][0], runs["online"][0]
    for key in ("loss_ld_main", "loss_ld_vlr", "loss_kd_main", "loss_feature_gt_boxes", "loss_qfl"):
        assert first_cached[key] == pytest.approx(first_online[key], rel=2e-3), key  # fp16 storage (module docstring)
    run = json.loads((root / "cached" / "run.json").read_text())
    assert run["teacher"]["cache"]["key"] == manifest["key"]


def test_the_recommended_pkd_distils_from_a_cache_as_from_the_online_teacher(root, cli_cache, tmp_path):  # cli_cache: the tiny teacher
    # detkd cache without --recipe holds what pkd reads; distilling from it gives the online run's first step
    cache = tmp_path / "pkd_cache"
    result = invoke("cache", root / "tiny_teacher.safetensors", "--data", root / "data", "--out", cache, "--shard-size", 4, "--no-progress")
    assert result.exit_code == 0, result.output
    runs = {}
    for name, cached in (("cached", ["--cache", cache]), ("online", [])):
        args = ["distill", "pkd", "--teacher", root / "tiny_teacher.safetensors", "--data", root / "data", *cached, "--force", "--epochs", 1, *SMALL, "--out", tmp_path / name]
        result = invoke(*args)
        assert result.exit_code == 0, result.output
        runs[name] = [json.loads(line) for line in (tmp_path / name / "metrics.jsonl").read_text().splitlines() if '"loss"' in line]
    first_cached, first_online = runs["cached"][0], runs["online"][0]
    assert first_cached["loss_pkd_all"] > 0 and first_cached["loss_qfl"] == first_online["loss_qfl"]  # same student, same batch
    assert first_cached["loss_pkd_all"] == pytest.approx(first_online["loss_pkd_all"], rel=2e-3)  # fp16 storage (module docstring)
    assert json.loads((tmp_path / "cached" / "run.json").read_text())["teacher"]["cache"]["key"] == json.loads((cache / "manifest.json").read_text())["key"]


@pytest.mark.parametrize(
    "change, expected",
    [
        ({"teacher": "other_teacher.safetensors"}, "another teacher (teacher.weights_sha256"),
        ({"data": "other_data"}, "other training data (data.annotations_sha256"),
        ({"set": "data.image_size=96"}, "another input transform (input.canvas"),
    ],
    ids=["teacher", "data", "transform"],
)
def test_cli_distill_refuses_a_cache_that_does_not_fit(root, cli_cache, change, expected, tmp_path):
    if "teacher" in change:
        make_teacher(root / change["teacher"].replace("other", "other_tiny"), load_dataset(root / "data", "train", DetectionTransform(SIZE)).classes, seed=9, channels=32)
        change = {"teacher": change["teacher"].replace("other", "other_tiny")}
    args = distill_args(root, cli_cache, teacher=change.get("teacher", "tiny_teacher.safetensors"), data=change.get("data", "data"))
    if "set" in change:
        args += ["--set", change["set"]]
    line = one_error_line(invoke(*args, "--out", tmp_path / "r"))
    assert expected in line and str(cli_cache) in line, line
    assert not (tmp_path / "r").exists()


def test_cli_distill_names_a_corrupted_shard_and_a_missing_region(root, cli_cache, tmp_path):
    broken = shutil.copytree(cli_cache, tmp_path / "broken")
    shard = broken / "shard-00001.safetensors"
    data = bytearray(shard.read_bytes())
    data[-3] ^= 0xFF
    shard.write_bytes(bytes(data))
    line = one_error_line(invoke(*distill_args(root, broken), "--out", tmp_path / "r1"))
    assert "shard-00001.safetensors: cache shard checksum mismatch" in line

    main_only = tmp_path / "main_only"
    result = invoke("cache", root / "tiny_teacher.safetensors", "--data", root / "data", "--out", main_only, "--recipe", "ld-tiny", *SMALL[:2], "--regions", "main", "--no-features", "--no-progress")
    assert result.exit_code == 0, result.output
    line = one_error_line(invoke(*distill_args(root, main_only), "--out", tmp_path / "r2"))
    assert "loss 'ld' reads teacher head in region vlr(gamma=0.25), but the cache holds head rows for main only" in line

    line = one_error_line(invoke("cache", root / "tiny_teacher.safetensors", "--data", root / "data", "--out", main_only, "--recipe", "ld-tiny", *SMALL[:2], "--no-progress"))
    assert "another fingerprint" in line


def count_checks(monkeypatch) -> dict[str, int]:
    """Counts TeacherCache.check_run calls and pair checks (DistillLoss.check_pair, once per loss)."""
    from distill.losses.registry import DistillLoss

    calls = {"check_run": 0, "check_pair": 0}
    for owner, name in ((TeacherCache, "check_run"), (DistillLoss, "check_pair")):
        def counted(*args, _name=name, _original=getattr(owner, name), **kwargs):
            calls[_name] += 1
            return _original(*args, **kwargs)

        monkeypatch.setattr(owner, name, counted)
    return calls


def test_a_cached_cli_distillation_checks_the_pair_and_the_cache_once(root, cli_cache, tmp_path, monkeypatch):
    calls = count_checks(monkeypatch)
    result = invoke(*distill_args(root, cli_cache), "--out", tmp_path / "r")
    assert result.exit_code == 0, result.output
    assert calls == {"check_run": 1, "check_pair": 4}  # ld-tiny: four losses, each checked once


def test_distiller_fit_checks_the_cache_once_and_trains_on_the_cached_split(caches, teacher, train_set, monkeypatch):
    from distill.engine import distiller as engine
    from recipes import load_recipe
    from teachers.cache import CachedVariantDataset

    trained_on = []

    class NoTraining:  # stands in for the Trainer: records the split fit hands over
        def __init__(self, student, recipe, train_set, *args, **kwargs):
            trained_on.append(train_set)

        def fit(self, resume):
            return None

    monkeypatch.setattr(engine, "Trainer", NoTraining)
    calls = count_checks(monkeypatch)
    student = create_student("gfl", backbone="resnet10t", num_classes=10, fpn_channels=8, head_convs=1)
    losses = [distill.create_loss("ld", pairer="main")]
    recipe = load_recipe("ld-tiny")
    distiller = engine.Distiller(student, teacher, losses, recipe, cache=caches["selected"])
    assert calls == {"check_run": 0, "check_pair": 1}
    distiller.fit(train_set, train_set, "unused")
    assert calls == {"check_run": 1, "check_pair": 1}
    assert isinstance(trained_on[0], CachedVariantDataset) and trained_on[0].base is train_set
    split = distiller.check_cache(train_set)  # what distill_run does before it evaluates the teacher
    distiller.fit(split, train_set, "unused", cache_checked=True)
    assert calls == {"check_run": 2, "check_pair": 1} and trained_on[1] is split
    with pytest.raises(CheckpointError, match="region vlr"):  # the check is never skipped
        engine.Distiller(student, teacher, [distill.create_loss("ld", pairer="vlr", pairer_params={"gamma": 0.5})], recipe, cache=caches["selected"]).fit(train_set, train_set, "unused")


def test_a_cached_distiller_never_runs_the_teacher(caches, teacher, train_set, monkeypatch):
    from distill.engine.distiller import Distiller

    cache = caches["selected"]
    losses = [distill.create_loss("ld", pairer="main"), distill.create_loss("kd", pairer="vlr"),
              distill.create_loss("feature", pairer="gt_boxes", student_channels=8, teacher_channels=16)]
    torch.manual_seed(1)
    student = create_student("gfl", backbone="resnet10t", num_classes=10, fpn_channels=8, head_convs=1)
    batch = collate([train_set.get(i, i == 1) for i in range(3)], pad_to=cache.canvas)
    online = Distiller(student, teacher, losses).step(student, batch)

    def refuse(*args, **kwargs):
        raise AssertionError("the teacher ran")

    monkeypatch.setattr(teacher.model, "features", refuse)
    cached = Distiller(student, teacher, losses, cache=cache).step(student, batch)
    for key, value in online.items():
        assert float(cached[key].detach()) == pytest.approx(float(value.detach()), rel=2e-3), key  # fp16 storage
    with pytest.raises(CheckpointError, match=r"location grid .*\(canvas 64x64\)"):
        Distiller(student, teacher, losses, cache=cache).step(student, collate([train_set.get(0, False)], pad_to=(96, 96)))


def test_the_cached_training_set_survives_worker_processes(caches, train_set):
    loader = build_loader(caches["selected"].training_set(train_set), batch_size=4, shuffle=True, seed=0, num_workers=1)
    set_epoch(loader, 1)
    batches = list(loader)
    assert len(batches) == 2 and all(b.images.shape[-2:] == (64, 64) for b in batches)
    assert [b.flipped.tolist() for b in batches] == [[train_set.flip_for(i, 1) for i in ids] for ids in [list(s) for s in torch.tensor(list(loader.sampler)).split(4)]]


def test_the_cache_and_the_frozen_teacher_are_one_teacher_source(caches, teacher):
    from distill.detector import TeacherSource

    assert isinstance(caches["selected"], TeacherSource) and isinstance(teacher, TeacherSource)
    # the same pair checks apply to both; a cache cannot finish the teacher's head on a student's
    # maps, so it offers no head stages (and refuses crosskd: test_losses_a_cache_cannot_serve_are_refused)
    assert teacher.spec.head_stages == 1 and caches["selected"].spec.head_stages is None
    assert caches["selected"].spec == dataclasses.replace(teacher.spec, head_stages=None)


def test_a_pickle_shard_with_a_matching_manifest_is_never_unpickled(caches, tmp_path):
    import hashlib
    import pickle

    class Boom:
        def __reduce__(self):
            return (pytest.fail, ("unpickled!",))

    folder = copy_cache(caches, tmp_path)
    payload = pickle.dumps(Boom())
    (folder / "shard-00000.safetensors").write_bytes(payload)
    manifest = json.loads((folder / "manifest.json").read_text())
    manifest["shards"][0].update(sha256=hashlib.sha256(payload).hexdigest(), bytes=len(payload))  # passes the checks
    (folder / "manifest.json").write_text(json.dumps(manifest))
    cache = TeacherCache.open(folder)
    with pytest.raises(CheckpointError, match="unreadable cache shard"):
        cache.rows(cache.manifest["image_ids"][0], False)


def test_check_run_is_not_skipped_for_a_new_loss_that_reuses_a_freed_id(caches, teacher, train_set):
    cache = caches["selected"]
    for _ in range(20):  # fresh loss objects each time: CPython often hands out the freed id again
        cache.check_run(teacher, train_set, [distill.create_loss("ld", pairer="vlr")], 32, MATCHER)
        with pytest.raises(CheckpointError, match="region vlr.*gamma"):
            cache.check_run(teacher, train_set, [distill.create_loss("ld", pairer="vlr", pairer_params={"gamma": 0.5})], 32, MATCHER)
