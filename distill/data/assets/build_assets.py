"""Regenerate the data files in this folder. Run by hand; nothing imports this at run time.

    python distill/data/assets/build_assets.py \\
        [--fashion-mnist /usr/share/datasets/fashion-mnist] [--skimage-data DIR] [--out DIR]

Writes (byte-reproducible: arrays are zipped with fixed timestamps):

* ``fashion_mnist_subset.npz``: the first 120 images of every class in Fashion-MNIST's training
  file (the pool for training scenes) and the first 30 of every class in its test file (the pool
  for validation scenes), with labels and their indices in the source files.
* ``textures.npz``: scikit-image's grass, gravel and brick textures (512x512 uint8 gray).
* ``NOTICE.txt``: licenses, sources with sha256 and the exact indices taken.

Sources: the Debian package ``dataset-fashion-mnist`` (``apt-get install dataset-fashion-mnist``)
and the ``data`` folder of scikit-image (``pip install scikit-image``, or unzip its wheel and pass
``--skimage-data <unzipped>/skimage/data``). scikit-image is located, not imported, and is not a
dependency of detkd. Needs only numpy and Pillow.
"""
from __future__ import annotations

import argparse
import gzip
import hashlib
import importlib.util
import io
import struct
import textwrap
import zipfile
from pathlib import Path

import numpy as np
from PIL import Image

CLASSES = ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
           "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot")
TRAIN_PER_CLASS = 120
VAL_PER_CLASS = 30
TEXTURES = {  # name -> original source, as documented in skimage.data's loaders
    "grass": "https://www.deviantart.com/linolafett/art/Grass-01-434853879",
    "gravel": "https://cc0textures.com/view.php?tex=Gravel04",
    "brick": "https://cc0textures.com/view.php?tex=Bricks25",
}
FASHION_FILES = {
    "train": ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz"),
    "val": ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"),
}
MIT_LICENSE = """\
The MIT License (MIT)

Copyright (c) 2017 Zalando SE, https://tech.zalando.com

Permission is hereby granted, free of charge, to any person obtaining a copy of this software and
associated documentation files (the "Software"), to deal in the Software without restriction,
including without limitation the rights to use, copy, modify, merge, publish, distribute,
sublicense, and/or sell copies of the Software, and to permit persons to whom the Software is
furnished to do so, subject to the following conditions:

The above copyright notice and this permission notice shall be included in all copies or
substantial portions of the Software.

THE SOFTWARE IS PROVIDED "AS IS", WITHOUT WARRANTY OF ANY KIND, EXPRESS OR IMPLIED, INCLUDING BUT
NOT LIMITED TO THE WARRANTIES OF MERCHANTABILITY, FITNESS FOR A PARTICULAR PURPOSE AND
NONINFRINGEMENT. IN NO EVENT SHALL THE AUTHORS OR COPYRIGHT HOLDERS BE LIABLE FOR ANY CLAIM, DAMAGES
OR OTHER LIABILITY, WHETHER IN AN ACTION OF CONTRACT, TORT OR OTHERWISE, ARISING FROM, OUT OF OR IN
CONNECTION WITH THE SOFTWARE OR THE USE OR OTHER DEALINGS IN THE SOFTWARE.
"""


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def read_idx(path: Path) -> np.ndarray:
    """An IDX file (MNIST format, gzipped): big-endian magic, dims, then uint8 data."""
    raw = gzip.decompress(path.read_bytes())
    magic = struct.unpack(">I", raw[:4])[0]
    ndim = magic & 0xFF
    dims = struct.unpack(f">{ndim}I", raw[4:4 + 4 * ndim])
    return np.frombuffer(raw, dtype=np.uint8, offset=4 + 4 * ndim).reshape(dims)


def save_npz(path: Path, arrays: dict[str, np.ndarray]) -> None:
    """Like ``np.savez_compressed`` but with fixed zip timestamps, so rebuilding gives the same bytes."""
    with zipfile.ZipFile(path, "w") as zf:
        for name in sorted(arrays):
            buf = io.BytesIO()
            np.lib.format.write_array(buf, np.ascontiguousarray(arrays[name]), allow_pickle=False)
            info = zipfile.ZipInfo(f"{name}.npy", date_time=(1980, 1, 1, 0, 0, 0))
            info.compress_type = zipfile.ZIP_DEFLATED
            info.external_attr = 0o644 << 16
            zf.writestr(info, buf.getvalue(), compresslevel=9)


def first_per_class(labels: np.ndarray, count: int) -> np.ndarray:
    """Indices of the first ``count`` items of each class, class by class, in file order."""
    return np.concatenate([np.flatnonzero(labels == c)[:count] for c in range(len(CLASSES))])


def build_fashion(source: Path) -> tuple[dict[str, np.ndarray], list[str]]:
    arrays: dict[str, np.ndarray] = {"classes": np.array(CLASSES)}
    notes: list[str] = []
    for split, count in (("train", TRAIN_PER_CLASS), ("val", VAL_PER_CLASS)):
        image_file, label_file = (source / name for name in FASHION_FILES[split])
        images, labels = read_idx(image_file), read_idx(label_file)
        keep = first_per_class(labels, count)
        arrays[f"{split}_images"] = images[keep]
        arrays[f"{split}_labels"] = labels[keep].astype(np.int64)
        arrays[f"{split}_indices"] = keep.astype(np.int64)
        notes.append(textwrap.fill(
            f"{split} pool: the first {count} images of each class of {image_file.name} "
            f"(sha256 {sha256(image_file)}), labels from {label_file.name} "
            f"(sha256 {sha256(label_file)}). Indices (0-based, file order):", width=100))
        for c, name in enumerate(CLASSES):
            taken = ", ".join(str(i) for i in keep[labels[keep] == c])
            notes.append(textwrap.fill(f"class {c} ({name}): {taken}", width=100,
                                       subsequent_indent="    "))
        notes.append("")
    return arrays, notes


def build_textures(source: Path) -> tuple[dict[str, np.ndarray], list[str]]:
    arrays, notes = {}, []
    for name, origin in TEXTURES.items():
        path = source / f"{name}.png"
        arrays[name] = np.array(Image.open(path).convert("L"))
        notes.append(textwrap.fill(
            f"{name}: {path.name} from scikit-image's data folder (sha256 {sha256(path)}), "
            f"{arrays[name].shape[1]}x{arrays[name].shape[0]} gray; originally {origin}, "
            f"Creative Commons CC0 (public domain dedication), per the docstring of "
            f"skimage.data.{name}.", width=100, subsequent_indent="    "))
    return arrays, notes


def notice(fashion_notes: list[str], texture_notes: list[str]) -> str:
    header = ("Data files shipped in distill/data/assets and where they come from.\n"
              "Regenerate with: python distill/data/assets/build_assets.py\n\n"
              "Scenes made by distill.data.scenes are synthetic: real Fashion-MNIST product\n"
              "photographs (objects) are pasted onto crops of real texture photographs\n"
              "(backgrounds).\n")
    fashion = ("\n== fashion_mnist_subset.npz: Fashion-MNIST (a subset) ==\n"
               "Source: https://github.com/zalandoresearch/fashion-mnist, via the Debian package\n"
               "dataset-fashion-mnist (files under /usr/share/datasets/fashion-mnist).\n"
               "Fashion-MNIST is released under the MIT license:\n\n" + MIT_LICENSE + "\n")
    textures = ("\n== textures.npz: texture photographs from scikit-image ==\n"
                "Source: scikit-image (https://scikit-image.org) skimage/data, copied unchanged.\n")
    return (header + fashion + "\n".join(fashion_notes) + textures + "\n".join(texture_notes) + "\n")


def find_skimage_data() -> Path:
    spec = importlib.util.find_spec("skimage")  # locate without importing (no skimage deps needed)
    if spec is None or not spec.submodule_search_locations:
        raise SystemExit("scikit-image not found: pip install scikit-image, or pass --skimage-data")
    return Path(list(spec.submodule_search_locations)[0]) / "data"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--fashion-mnist", type=Path, default=Path("/usr/share/datasets/fashion-mnist"))
    parser.add_argument("--skimage-data", type=Path, default=None)
    parser.add_argument("--out", type=Path, default=Path(__file__).resolve().parent)
    args = parser.parse_args()
    fashion, fashion_notes = build_fashion(args.fashion_mnist)
    textures, texture_notes = build_textures(args.skimage_data or find_skimage_data())
    save_npz(args.out / "fashion_mnist_subset.npz", fashion)
    save_npz(args.out / "textures.npz", textures)
    (args.out / "NOTICE.txt").write_text(notice(fashion_notes, texture_notes))
    for name in ("fashion_mnist_subset.npz", "textures.npz", "NOTICE.txt"):
        print(f"{args.out / name}: {(args.out / name).stat().st_size} bytes")


if __name__ == "__main__":
    main()
