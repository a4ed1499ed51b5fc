"""``detkd export``: a run's student as an ONNX file (inference path and postprocess in the graph)."""
from __future__ import annotations

from pathlib import Path

import typer

from distill.cli.app import app, user_errors
from distill.errors import ConfigError

FORMATS = ("onnx",)


def default_out(run: Path, checkpoint: Path) -> Path:
    """RUN/export/student.onnx for a run folder (its checkpoints/ folder and a CKPT.onnx beside a
    checkpoint are guarded as checkpoint data); CKPT.student.onnx beside a lone checkpoint."""
    if run.is_dir():
        return run / "export" / "student.onnx"
    if checkpoint.parent.name == "checkpoints" and (checkpoint.parent.parent / "run.json").is_file():
        return checkpoint.parent.parent / "export" / f"{checkpoint.stem}.onnx"
    return checkpoint.parent / f"{checkpoint.stem}.student.onnx"


@app.command("export")
@user_errors
def export_command(
    run: Path = typer.Argument(..., help="Run folder (its best checkpoint, else its last) or a .safetensors checkpoint."),
    format: str = typer.Option("onnx", "--format", help="Export format: onnx."),
    opset: int = typer.Option(17, "--opset", help="ONNX opset (>= 16: RoIAlign aligned=True and GridSample)."),
    dynamic_batch: bool = typer.Option(False, "--dynamic-batch", help="Symbolic batch axis (otherwise batch 1)."),
    raw: bool = typer.Option(False, "--raw", help="Also output the raw head outputs (logits and box logits)."),
    out: Path = typer.Option(None, "--out", help="ONNX file to write (default: RUN/export/student.onnx, or CKPT.student.onnx)."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace an existing --out that detkd did not write."),
) -> None:
    """Student -> ONNX: NMS (dense) or top-K (sparse) inside the graph; boxes, scores, labels, valid."""
    if format not in FORMATS:
        raise ConfigError(f"--format {format!r}: supported formats are {', '.join(FORMATS)}")
    try:
        import onnx  # noqa: F401
        import onnxruntime  # noqa: F401
    except ImportError:
        raise ConfigError('ONNX export needs onnx and onnxruntime: pip install -e ".[export]"') from None
    from distill.checkpoint import atomic_write_bytes, require_meta, resolve_checkpoint
    from distill.export.onnx_file import export_onnx, is_detkd_onnx
    from distill.outputs import check_output_file
    from distill.report import console
    from students.saved import load_detector

    path = resolve_checkpoint(run)
    if out is None:
        out = default_out(run, path)
    check_output_file(out, ours=is_detkd_onnx, overwrite=overwrite)
    model, meta = load_detector(path)
    require_meta(meta, path, "image_size")
    data = export_onnx(model, meta, opset=opset, dynamic_batch=dynamic_batch, raw=raw)
    atomic_write_bytes(out, data, mode=0o644)
    inside = "top-K over queries x classes" if model.family == "sparse" else "per-level top-k + class-aware NMS"
    console.print(f"{model.config.get('name')} exported to {out} ({len(data) / 1e6:.1f} MB, opset {opset}, "
                  f"{'dynamic' if dynamic_batch else 'batch 1'}; in the graph: {inside})", markup=False, highlight=False)
