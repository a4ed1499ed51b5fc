"""ONNX export per family: file size, and onnxruntime (CPU) latency against PyTorch eager at batch 1
and 16 (same inputs; eager = ``features`` + ``head`` + ``postprocess``, the exported graph = the same
path with its postprocess inside).

    python benchmarks/export.py                    # the four tiny recipes at 128 px
    python benchmarks/export.py --only gfl,dab6 --repeats 5

Random-init students (size and latency do not depend on the weights), exported with
``--dynamic-batch`` (one file for both batch sizes). Timing: median of interleaved repeats
(``common.interleaved_medians``), one process, the machine's threads. Prints a table and writes
``benchmarks/records/export.json``.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch
from rich.console import Console
from rich.table import Table

sys.path.insert(0, str(Path(__file__).parent))
from common import Row, command_line, interleaved_medians, select_rows  # noqa: E402

from distill.checkpoint import atomic_write_text  # noqa: E402
from distill.export import export_onnx, run_session  # noqa: E402
from recipes import load_recipe  # noqa: E402
from students import create_student  # noqa: E402

ROWS = [Row("GFL (dense, NMS in graph)", "gfl", "gfl-tiny"), Row("ASAG-S, learned anchors", "asag-s", "asag-s-tiny"),
        Row("Sparse R-CNN, 6 stages", "sparse6", "sparse6-tiny"), Row("DAB-DETR, 6 layers", "dab6", "dab6-tiny")]
SIZE = 128


def measure(recipe: str, repeats: int) -> dict:
    import onnxruntime as ort

    spec = load_recipe(recipe).student
    torch.manual_seed(0)
    model = create_student(spec.name, **spec.params).eval()
    data = export_onnx(model, {"image_size": SIZE}, dynamic_batch=True)
    session = ort.InferenceSession(data, providers=["CPUExecutionProvider"])
    row = {"recipe": recipe, "student": spec.name, "size_mb": len(data) / 1e6,
           "params": sum(p.numel() for p in model.parameters())}
    for batch in (1, 16):
        x = torch.randn(batch, 3, SIZE, SIZE)
        sizes = torch.tensor([[SIZE, SIZE]] * batch)

        @torch.no_grad()
        def eager():
            model.postprocess(model.head(model.features(x), sizes), sizes)

        times = interleaved_medians({"eager": eager, "onnx": lambda: run_session(session, x)}, repeats=repeats, warmup=2)
        row[f"eager_ms_b{batch}"], row[f"onnx_ms_b{batch}"] = 1e3 * times["eager"], 1e3 * times["onnx"]
        row[f"speedup_b{batch}"] = times["eager"] / times["onnx"]
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", default=None, help="comma-separated rows by slug (default: all): " + ",".join(r.slug for r in ROWS))
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "records" / "export.json")
    args = parser.parse_args()
    rows = [{"row": row.name, **measure(row.recipe, args.repeats)} for row in select_rows(parser, args.only, ROWS)]
    table = Table(title=f"ONNX export at {SIZE} px: size and onnxruntime CPU vs PyTorch eager (median of {args.repeats})")
    for col in ("student", "MB", "eager b1 ms", "ort b1 ms", "x b1", "eager b16 ms", "ort b16 ms", "x b16"):
        table.add_column(col, justify="right")
    for r in rows:
        table.add_row(r["row"], f"{r['size_mb']:.1f}", f"{r['eager_ms_b1']:.1f}", f"{r['onnx_ms_b1']:.1f}", f"{r['speedup_b1']:.2f}",
                      f"{r['eager_ms_b16']:.0f}", f"{r['onnx_ms_b16']:.0f}", f"{r['speedup_b16']:.2f}")
    Console(width=150).print(table)
    record = {"image_size": SIZE, "threads": torch.get_num_threads(), "repeats": args.repeats, "torch": torch.__version__, "rows": rows,
              "command": command_line()}
    atomic_write_text(args.out, json.dumps(record, indent=2) + "\n")


if __name__ == "__main__":
    main()
