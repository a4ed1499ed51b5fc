"""``detkd cache``: run a frozen teacher once over a split and store what the losses read."""
from __future__ import annotations

import re
from pathlib import Path

import typer

from distill.cli.app import DEVICE_HELP, app, user_errors
from distill.cli.train_cmds import SET_HELP
from distill.errors import ConfigError

REGION_SYNTAX = re.compile(r"([A-Za-z_]\w*)(?:\((.*)\))?")


def split_top_level(text: str) -> list[str]:
    """``"main,vlr(gamma=0.5, metric=diou)"`` -> ``["main", "vlr(gamma=0.5, metric=diou)"]``."""
    items, depth, current = [], 0, []
    for ch in text:
        if ch == "," and depth == 0:
            items.append("".join(current))
            current = []
            continue
        depth += (ch == "(") - (ch == ")")
        current.append(ch)
    items.append("".join(current))
    return [item.strip() for item in items if item.strip()]


def parse_regions(text: str, option: str = "--regions") -> tuple:
    """Region names with optional options, as ``detkd`` prints them: ``main,vlr(gamma=0.5)``."""
    import yaml

    from distill.regions import create_region

    regions = []
    for item in split_top_level(text):
        match = REGION_SYNTAX.fullmatch(item)
        if match is None:
            raise ConfigError(f"{option}: cannot read {item!r}; write a region name or name(key=value, ...)")
        params = {}
        for part in split_top_level(match.group(2) or ""):
            key, sep, value = part.partition("=")
            if not sep:
                raise ConfigError(f"{option}: option {part!r} of region {match.group(1)!r} needs key=value")
            params[key.strip()] = yaml.safe_load(value.strip())
        regions.append(create_region(match.group(1), **params))
    if not regions:
        raise ConfigError(f"{option}: no region given")
    return tuple(regions)


def parse_variants(text: str | None) -> tuple[str, ...] | None:
    from teachers.cache_format import VARIANTS

    if text is None:
        return None
    variants = tuple(split_top_level(text))
    unknown = [v for v in variants if v not in VARIANTS]
    if unknown or not variants:
        raise ConfigError(f"--variants: unknown variant {', '.join(unknown) or '(none given)'}; choose from {', '.join(VARIANTS)}")
    return variants


@app.command("cache")
@user_errors
def cache_command(
    teacher: Path = typer.Argument(..., help="Teacher checkpoint file or run folder."),
    data: Path = typer.Option(..., "--data", help="Dataset folder or dataset YAML."),
    out: Path = typer.Option(..., "--out", help="Cache folder to create, or to resume an interrupted build in."),
    split: str = typer.Option("train", "--split", help="Split to cache."),
    recipe: str = typer.Option(None, "--recipe", help="Distillation recipe: input size, class map, the student's assignment, flips, and the regions its losses read."),
    set_: list[str] = typer.Option([], "--set", help=SET_HELP),
    variants: str = typer.Option(None, "--variants", help="Deterministic variants to cache: none,hflip (default: those the recipe draws, else both)."),
    regions: str = typer.Option(None, "--regions", help="Regions of the class / bin-logit rows, e.g. main,vlr or 'vlr(gamma=0.5)' (default: the recipe's KD/LD regions; without --recipe none, as the recommended recipe, pkd, reads features only)."),
    features: bool = typer.Option(None, "--features/--no-features", help="Also cache FPN feature rows (default: when a loss of the recipe, else of the recommended pkd, reads features)."),
    feature_regions: str = typer.Option(None, "--feature-regions", help="Regions of the feature rows (default: the recipe's, else --regions)."),
    dense: bool = typer.Option(False, "--dense", help="Every valid location (region 'all') instead of a selection."),
    image_size: int = typer.Option(None, "--image-size", help="Input size (default: the recipe's, else the teacher's)."),
    shard_size: int = typer.Option(None, "--shard-size", help="Images per shard (default 256)."),
    batch_size: int = typer.Option(None, "--batch-size", help="Teacher batch size (default 16)."),
    workers: int = typer.Option(0, "--workers", help="Data loader workers."),
    progress: bool = typer.Option(True, "--progress/--no-progress"),
    device: str = typer.Option("auto", "--device", help=DEVICE_HELP),
) -> None:
    """Run the frozen teacher once over a split; store its logits (and features) at the distilled locations, fp16."""
    from distill.engine.cache import CacheRequest, build_teacher_cache
    from distill.report import console, key_value_table
    from recipes import load_recipe
    from teachers.cache_select import recipes_served

    if set_ and recipe is None:
        raise ConfigError("--set changes a recipe: pass --recipe too")
    resolved = load_recipe(recipe, set_) if recipe else None
    request = CacheRequest(
        variants=parse_variants(variants),
        head_regions=parse_regions(regions) if regions else None,
        features=features,
        feature_regions=parse_regions(feature_regions, "--feature-regions") if feature_regions else None,
        dense=dense,
    )
    summary, spec, reports = build_teacher_cache(
        teacher, data, out, split=split, recipe=resolved, request=request, image_size=image_size, shard_size=shard_size,
        batch_size=batch_size, workers=workers, show_progress=progress, device=device,
    )
    if not reports:  # rank 0 reports
        return
    if summary.get("already_complete"):
        console.print(f"{out}: cache already complete (nothing to do)", markup=False)
    rows = {
        "images": summary["images"],
        "variants": ",".join(summary["variants"]),
        "head regions": "every query + the teacher's matches" if spec.queries else ", ".join(map(str, spec.head_regions)) or "-",
        "feature regions": ", ".join(map(str, spec.feature_regions)) or "-",
        "shards": summary["shards"],
        "built this run (images x variants)": summary["built_entries"],
        "seconds": summary["seconds"],
        "images x variants / s": summary["entries_per_s"],
        "bytes": summary["bytes"],
        "bytes per image variant": summary["bytes_per_entry"],
        "dense fp16 bytes per image variant": summary["dense_fp16_bytes_per_entry"],
        "fraction of dense": summary["fraction_of_dense"],
    }
    console.print(key_value_table(f"teacher cache {out}", rows))
    served = recipes_served(spec)
    console.print(
        f"manifest and summary.json in {out}; serves {', '.join(served) if served else 'no shipped recipe'}: "
        f"detkd distill {served[0] if served else 'RECIPE'} --teacher {teacher} --data {data} --cache {out}",
        markup=False,
    )
