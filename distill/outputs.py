"""Checks every command runs on its outputs before any work: can it write there, and would it destroy data?

Rules (one :class:`OutputError` line each, before anything is read, trained or written):

- **Writable.** The output's nearest existing folder accepts a new file (a probe file is created
  and removed): a read-only folder, a full inode table or a file in the way is found before hours
  of work, not at the first save.
- **Nothing overwritten that detkd did not write.** An existing file is replaced only when it is
  the same command's own output (an eval record, a predictions file) or with an explicit
  ``--overwrite``.
- **Never inside someone else's data.** No output goes inside a dataset folder (one holding
  ``images/`` and a ``train.json`` / ``val.json`` / ``test.json``, or the ``--data`` of the command),
  a teacher cache, or a run's ``checkpoints/`` folder (only the eval records detkd names
  ``NAME.eval-SPLIT.json`` go there), and never over a checkpoint (``.safetensors``), its ``.json``
  sidecar or a run folder's own files — not even with ``--overwrite``.
"""
from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Callable, Iterable

from distill.errors import OutputError

DATASET_SPLITS = ("train", "val", "test")
RUN_FILES = ("run.json", "recipe.yaml", "metrics.jsonl", "summary.json", "train_state.safetensors")
CACHE_FORMAT = "detkd-teacher-cache"  # teachers.cache_format.FORMAT (distill does not import teachers)


def nearest_existing(path: Path) -> Path:
    """``path`` or its closest ancestor that exists."""
    path = Path(os.path.abspath(path))
    while not path.exists() and path != path.parent:
        path = path.parent
    return path


def check_writable(path: str | Path, what: str = "--out") -> None:
    """Create and remove a probe file where ``path`` (a file or folder to write) will be created."""
    path = Path(path)
    folder = path if path.is_dir() else nearest_existing(path.parent if path.exists() else path)
    if not folder.is_dir():
        raise OutputError(f"{path}: {what} cannot be created, {folder} is a file")
    try:
        fd, probe = tempfile.mkstemp(prefix=".detkd-probe.", suffix=".tmp", dir=folder)
        os.close(fd)
        os.unlink(probe)
    except OSError as exc:
        raise OutputError(f"{path}: {what} is not writable ({exc.strerror or exc} in {folder}); nothing was done") from None


def is_dataset_folder(folder: Path) -> bool:
    return (folder / "images").is_dir() and any((folder / f"{split}.json").is_file() for split in DATASET_SPLITS)


def is_cache_folder(folder: Path) -> bool:
    manifest = folder / "manifest.json"
    if not manifest.is_file():
        return False
    try:
        return json.loads(manifest.read_text()).get("format") == CACHE_FORMAT
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, AttributeError):
        return False


def is_checkpoint_folder(folder: Path) -> bool:
    """A run's ``checkpoints/`` folder. (Checkpoint files anywhere else are guarded one by one: a
    ``.safetensors`` file and its ``.json`` sidecar are never an output.)"""
    return folder.name == "checkpoints" and folder.is_dir() and (folder.parent / "run.json").is_file()


def is_eval_record_name(name: str) -> bool:
    return ".eval-" in name and name.endswith(".json")


def data_roots(data: str | Path | None, splits: Iterable[str] = DATASET_SPLITS) -> list[Path]:
    """The folders of a command's ``--data`` (the folder, or a YAML spec's annotation and image folders)."""
    if data is None:
        return []
    data = Path(data)
    if data.is_dir():
        return [data]
    from distill.data.loader import resolve_split
    from distill.errors import DetkdError

    roots = []
    for split in splits:
        try:
            ann_file, image_root = resolve_split(data, split)
        except DetkdError:
            continue
        roots += [ann_file.parent, image_root]
    return roots


def protected(path: Path, roots: Iterable[Path] = (), self_too: bool = True) -> str | None:
    """Why writing ``path`` (file or folder) would destroy data, or None.

    ``self_too``: ``path`` itself may not be a dataset, cache or checkpoint folder either (off for
    ``detkd data scenes --overwrite``, which replaces a dataset folder on purpose).
    """
    path = Path(os.path.abspath(path))
    real = Path(os.path.realpath(path))
    for root in roots:
        root = Path(os.path.realpath(root))
        if real == root or root in real.parents:
            return f"is the dataset folder {root} of --data" if real == root else f"is inside the dataset folder {root} of --data"
    if self_too and path.is_dir():
        for check, kind in ((is_dataset_folder, "a dataset folder"), (is_cache_folder, "a teacher cache"), (is_checkpoint_folder, "a checkpoint folder")):
            if check(path):
                return f"is {kind}"
    if path.suffix == ".safetensors":
        return "is a checkpoint file"
    if path.with_suffix(".safetensors").is_file():
        return f"is the metadata of the checkpoint {path.with_suffix('.safetensors').name}"
    if path.name in RUN_FILES and (path.parent / "run.json").is_file():
        return f"is a file of the run folder {path.parent}"
    for folder in path.parents:
        if is_dataset_folder(folder):
            return f"is inside the dataset folder {folder}"
        if is_cache_folder(folder):
            return f"is inside the teacher cache {folder}"
        if is_checkpoint_folder(folder) and not (folder == path.parent and is_eval_record_name(path.name)):
            return f"is inside the checkpoint folder {folder} (only NAME.eval-SPLIT.json records go there)"
    return None


def check_output_file(
    path: str | Path, ours: Callable[[Path], bool], overwrite: bool = False, roots: Iterable[Path] = (), what: str = "--out"
) -> None:
    """An output file: not protected, not an existing file detkd did not write (unless ``overwrite``), writable."""
    path = Path(path)
    reason = protected(path, roots)
    if reason is not None:
        raise OutputError(f"{path}: {what} {reason}; refusing to write there, choose another {what}")
    if path.is_dir():
        raise OutputError(f"{path}: {what} is a folder; name a file")
    if path.exists() and not overwrite and not ours(path):
        raise OutputError(f"{path}: {what} exists and was not written by this command; pass --overwrite to replace it, or choose another {what}")
    check_writable(path, what)


def check_output_folder(
    path: str | Path, roots: Iterable[Path] = (), what: str = "--out", owned: Callable[[Path], bool] | None = None, self_too: bool = True
) -> None:
    """An output folder: not a file, not protected, writable; with ``owned``, an existing non-empty
    folder must pass it (it holds this command's own outputs: a run, a demo, a cache).
    ``self_too`` as in :func:`protected`."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise OutputError(f"{path}: {what} is a file; it must be a new or empty folder")
    reason = protected(path, roots, self_too=self_too)
    if reason is not None:
        raise OutputError(f"{path}: {what} {reason}; refusing to write there, choose another {what}")
    if owned is not None and path.is_dir() and any(path.iterdir()) and not owned(path):
        raise OutputError(f"{path}: {what} is a folder that holds other files; choose a new or empty folder")
    check_writable(path, what)


def read_json(path: Path):
    try:
        return json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return None
