"""What do the LD paper's loss weights mean in our normalised losses?

    python benchmarks/calibrate_weights.py STUDENT_CKPT --teacher TEACHER_RUN --data DATA

The official LD code normalises its distillation terms with constants (Main LD ``/4``, VLR LD
``/16``) or per FPN level (KD), so its published weights (LD 0.25, VLR LD 0.25, KD 10) act with a
strength that depends on images per GPU and on how many positives an image has. Ours are
normalised per distilled row and do not. This script runs the reference's settings (``legacy=True``,
2 images per batch as in the paper's 8 GPUs x 2 images) and ours with weight 1 on the same
batches of a trained student and its teacher, and reports the ratio: the weight in our losses that
gives the paper's strength on this data (ld-gfl-spec: "set weights by matching loss magnitudes of a
legacy run at 2 img/GPU"). Prints a table and writes ``calibrate_weights.json`` next to the student.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
from common import command_line  # the benchmarks' shared helpers (this script's folder is on sys.path)
from rich.console import Console
from rich.table import Table

from distill import create_loss
from distill.checkpoint import resolve_checkpoint
from distill.config import REFERENCE_VLR_METRIC
from distill.data import DetectionTransform, collate, load_dataset
from distill.losses import DistillInputs
from students.saved import load_detector
from teachers import load_teacher

# (row, reference setting as (loss, weight, region, params), ours with weight 1 as (loss, region, params)).
# The reference's VLR is its own band: "DIoU" as intersection over the anchor's area (REFERENCE_VLR_METRIC,
# what ``reference: ld`` selects), so its VLR LD sums over the locations the reference would distil.
REFERENCE_VLR = {"metric": REFERENCE_VLR_METRIC}
PAIRS = [
    ("Main KD, ours bce", ("kd", 10.0, "main", {"mode": "softmax"}), ("kd", "main", {"mode": "bce"})),
    ("Main KD, ours softmax", ("kd", 10.0, "main", {"mode": "softmax"}), ("kd", "main", {"mode": "softmax"})),
    ("Main LD (tau 10)", ("ld", 0.25, "main", {}), ("ld", "main", {})),
    ("VLR LD (tau 10)", ("ld", 0.25, "vlr", {}), ("ld", "vlr", {})),
]


def reference_loss(name: str, weight: float, region: str, params: dict):
    """The reference's term: legacy normaliser, and on the VLR its own band."""
    return create_loss(name, weight=weight, pairer=region, pairer_params=REFERENCE_VLR if region == "vlr" else None, legacy=True, **params)


@torch.no_grad()
def calibrate(student_ckpt: Path, teacher_run: Path, data: Path, image_size: int, batches: int, images_per_batch: int) -> dict:
    student, _ = load_detector(student_ckpt)
    student.train()  # the assignment and the quality weights as during training
    teacher = load_teacher(teacher_run)
    dataset = load_dataset(data, "train", DetectionTransform(image_size))
    pairs = [
        (row, reference_loss(*ref), create_loss(ours[0], pairer=ours[1], **ours[2]))
        for row, ref, ours in PAIRS
    ]
    sums = {row: [0.0, 0.0] for row, _, _ in pairs}
    student_terms: dict[str, float] = {}
    count = min(batches, len(dataset) // images_per_batch)
    for b in range(count):
        batch = collate([dataset[i] for i in range(b * images_per_batch, (b + 1) * images_per_batch)])
        features = student.features(batch.images)
        outputs = student.head(features, batch.image_sizes)
        terms, matches = student.loss(outputs, batch.targets, batch.image_sizes)
        for key, value in terms.items():
            student_terms[key] = student_terms.get(key, 0.0) + float(value) / count
        s_in = DistillInputs(student.spec, outputs, features, matches, batch.image_sizes)
        t_in = teacher.inputs(batch, s_in, frozenset({"head", "features"}))
        for row, reference, ours in pairs:
            for column, loss in enumerate((reference, ours)):  # each on its own pairs (the VLR bands differ)
                sums[row][column] += float(loss(s_in, t_in, loss.pairer(s_in, t_in, batch.targets, loss.space))) / count
    rows = {row: {"reference": ref, "ours_weight_1": ours, "equivalent_weight": ref / ours if ours > 0 else None} for row, (ref, ours) in sums.items()}
    return {"batches": count, "images_per_batch": images_per_batch, "student_terms": student_terms, "rows": rows}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("student", type=Path, help="a trained student checkpoint or run folder")
    parser.add_argument("--teacher", type=Path, required=True)
    parser.add_argument("--data", type=Path, required=True)
    parser.add_argument("--image-size", type=int, default=128)
    parser.add_argument("--batches", type=int, default=60)
    parser.add_argument("--images-per-batch", type=int, default=2)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    checkpoint = resolve_checkpoint(args.student)
    result = calibrate(checkpoint, args.teacher, args.data, args.image_size, args.batches, args.images_per_batch)
    result.update(student=str(checkpoint), teacher=str(args.teacher), data=str(args.data), command=command_line())

    console = Console()
    table = Table(title=f"reference loss weights in our normalisation ({result['batches']} batches of {args.images_per_batch} images)")
    for column in ("term", "reference (legacy, paper weight)", "ours, weight 1", "equivalent weight"):
        table.add_column(column, justify="left" if column == "term" else "right")
    for row, values in result["rows"].items():
        weight = values["equivalent_weight"]
        table.add_row(row, f"{values['reference']:.4f}", f"{values['ours_weight_1']:.4f}", "-" if weight is None else f"{weight:.2f}")
    console.print(table)
    console.print("student's own terms: " + ", ".join(f"{k} {v:.4f}" for k, v in result["student_terms"].items()))
    out = checkpoint.parent / "calibrate_weights.json"
    out.write_text(json.dumps(result, indent=2) + "\n")
    console.print(f"written to {out}")


if __name__ == "__main__":
    main()
