"""Run a checkpoint on image files and draw its detections."""
from __future__ import annotations

import json
import warnings
from pathlib import Path

import torch
from PIL import Image, ImageDraw, ImageFont, UnidentifiedImageError

from distill.checkpoint import atomic_write, atomic_write_text, make_dir
from distill.errors import DataError
from distill.structures import Detections, Target
from students.saved import load_detector

# Distinct, colour-blind-friendly hues (Okabe-Ito), cycled over classes.
MIN_DRAW_SIDE = 384
PALETTE = [(230, 159, 0), (86, 180, 233), (0, 158, 115), (240, 228, 66), (0, 114, 178), (213, 94, 0), (204, 121, 167), (255, 255, 255)]


def read_image(path: Path) -> Image.Image:
    try:
        with warnings.catch_warnings():
            # PIL only warns between MAX_IMAGE_PIXELS and twice that; refuse the whole range.
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(path) as img:
                return img.convert("RGB")
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise DataError(f"{path}: image refused, {exc}") from None
    except (OSError, UnidentifiedImageError) as exc:
        raise DataError(f"{path}: cannot read image ({exc.__class__.__name__})") from None


def draw_detections(image: Image.Image, det: Detections, classes: list[str], score_thresh: float) -> Image.Image:
    """A copy of ``image`` with boxes and 'label score' tags for detections above the threshold.

    Small images (the 128 px scenes) are enlarged first so that the tags stay readable.
    """
    zoom = max(1, -(-MIN_DRAW_SIDE // max(image.size)))  # ceil division
    canvas = image.resize((image.width * zoom, image.height * zoom), Image.NEAREST) if zoom > 1 else image.copy()
    draw = ImageDraw.Draw(canvas)
    font = ImageFont.load_default()
    width = max(1, round(max(canvas.size) / 200))
    for box, score, label in zip(det.boxes.tolist(), det.scores.tolist(), det.labels.tolist()):
        if score < score_thresh:
            continue
        box = [v * zoom for v in box]
        color = PALETTE[label % len(PALETTE)]
        draw.rectangle(box, outline=color, width=width)
        text = f"{classes[label]} {score:.2f}"
        left, top, right, bottom = draw.textbbox((box[0], box[1]), text, font=font)
        y = max(0, box[1] - (bottom - top) - 2)
        draw.rectangle((box[0], y, box[0] + right - left + 2, y + bottom - top + 2), fill=color)
        draw.text((box[0] + 1, y), text, fill=(0, 0, 0), font=font)
    return canvas


@torch.no_grad()
def detect(model, image: Image.Image, image_size: int, size_divisor: int = 32) -> Detections:
    """Detections in original-image pixels for one PIL image."""
    import numpy as np

    from distill.data import DetectionTransform, Sample, collate

    pixels = torch.from_numpy(np.asarray(image, dtype=np.uint8).copy()).permute(2, 0, 1)  # (3, H, W)
    tensor, _, scale = DetectionTransform(image_size, hflip_prob=0.0)(pixels, torch.zeros(0, 4), flip=False)
    sample = Sample(image=tensor, target=Target.empty(), image_id=0, scale=scale, flipped=False)
    batch = collate([sample], size_divisor=size_divisor).to(next(model.parameters()).device)
    det = model.postprocess(model.head(model.features(batch.images), batch.image_sizes), batch.image_sizes)[0]
    return Detections(boxes=det.boxes.cpu() / sample.scale, scores=det.scores.cpu(), labels=det.labels.cpu())


def is_detections_file(path: Path) -> bool:
    """Whether ``path`` is a detections.json that predict wrote (a list of {image, detections})."""
    from distill.outputs import read_json

    records = read_json(path)
    return isinstance(records, list) and all(isinstance(r, dict) and {"image", "detections"} <= r.keys() for r in records)


def check_outputs(images: list[Path], out: Path, overwrite: bool = False) -> None:
    """Refuse, before anything is written: an --out that is a file, inside a dataset, cache or
    checkpoint folder, or not writable; a detections.json predict did not write; inputs whose PNGs
    would collide. The ``NAME.pred.png`` pictures are predict's own and are replaced."""
    from distill.outputs import check_output_file, check_output_folder

    if out.exists() and not out.is_dir():
        raise DataError(f"{out}: --out is a file; predictions go into a folder")
    check_output_folder(out)
    check_output_file(out / "detections.json", ours=is_detections_file, overwrite=overwrite, what="--out's detections.json")
    seen: dict[str, Path] = {}
    for path in images:
        stem = Path(path).stem
        if stem in seen:
            raise DataError(f"{seen[stem]} and {path}: same file name, both would be written to {out / (stem + '.pred.png')}; predict them into separate --out folders")
        seen[stem] = Path(path)


def predict_images(
    checkpoint: Path, images: list[Path], out: Path, score_thresh: float = 0.3, device: str | None = "cpu", overwrite: bool = False
) -> list[Path]:
    from distill.checkpoint import require_meta, resolve_checkpoint
    from distill.engine.device import resolve_device

    out = Path(out)
    check_outputs(images, out, overwrite)
    torch_device = resolve_device(device)
    path = resolve_checkpoint(checkpoint)
    model, meta = load_detector(path)
    require_meta(meta, path, "image_size")
    model.to(torch_device)
    pictures = [read_image(Path(p)) for p in images]  # every input readable before any output
    make_dir(out)
    written, records = [], []
    for path, image in zip(images, pictures):
        det = detect(model, image, meta["image_size"], meta.get("size_divisor", 32))
        target = out / f"{Path(path).stem}.pred.png"
        drawn = draw_detections(image, det, meta["classes"], score_thresh)
        atomic_write(target, lambda tmp: drawn.save(tmp, format="PNG"))
        written.append(target)
        keep = det.scores >= score_thresh
        records.append(
            {
                "image": str(path),
                "detections": [
                    {"box_xyxy": [round(v, 2) for v in b], "score": round(s, 4), "label": meta["classes"][l]}
                    for b, s, l in zip(det.boxes[keep].tolist(), det.scores[keep].tolist(), det.labels[keep].tolist())
                ],
            }
        )
    atomic_write_text(out / "detections.json", json.dumps(records, indent=2) + "\n")
    return written
