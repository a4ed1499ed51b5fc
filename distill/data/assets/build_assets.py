"""Regenerate the data files in this folder. Run by hand; nothing imports this at run time.

    python distill/data/assets/build_assets.py \\
        [--fashion-mnist /usr/share/datasets/fashion-mnist] [--skimage-data DIR] \\
        [--animal-mnist DIR] [--opencv-digits PNG] [--out DIR]

Writes (byte-reproducible: arrays are zipped with fixed timestamps):

* ``fashion_mnist_subset.npz``: the first 120 images of every class in Fashion-MNIST's training
  file (the pool for training scenes) and the first 30 of every class in its test file (the pool
  for validation scenes), with labels and their indices in the source files.
* ``textures.npz``: scikit-image's grass, gravel and brick textures (512x512 uint8 gray).
* ``clutter_objects.npz`` (for ``detkd data clutter``): animal silhouettes from Animal-MNIST
  (28x28) and handwritten digits from OpenCV's ``digits.png`` (20x20), per class the first 160
  distinct images (the training pool) and the next 40 (the validation pool).
* ``photos.npz``: six CC0 / public-domain colour photographs from scikit-image (astronaut, camera,
  chelsea, coffee, rocket, hubble_deep_field), shrunk to a shorter side of at most 320 px.
* ``NOTICE.txt``: licenses, sources with sha256 and the exact indices taken.

Sources: the Debian package ``dataset-fashion-mnist`` (``apt-get install dataset-fashion-mnist``);
the ``data`` folder of scikit-image (``pip install scikit-image``, or unzip its wheel and pass
``--skimage-data <unzipped>/skimage/data``); the data folder of the PyPI package ``animal-mnist``
0.4 (``pip download --no-deps animal-mnist==0.4``, unzip, pass
``--animal-mnist <unzipped>/animal_mnist/data/Animal_MNIST``); ``digits.png`` from the Debian
package ``opencv-doc`` (``apt-get download opencv-doc`` then ``dpkg-deb --fsys-tarfile
opencv-doc_*.deb | tar -x --wildcards '*/examples/data/digits.png'``). Packages are located, not
imported, and none is a dependency of detkd. Needs only numpy and Pillow.
"""
from __future__ import annotations

import argparse
import gzip
import hashlib
import importlib.util
import io
import pickle
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
ANIMALS = ("bear", "bird", "cat", "cow", "dog", "elephant", "giraffe", "horse", "sheep", "zebra")
DIGITS = tuple(f"digit {d}" for d in range(10))
CLUTTER_TRAIN_PER_CLASS = 160
CLUTTER_VAL_PER_CLASS = 40
PHOTO_SIDE = 320  # shorter side after shrinking: enough for crops at the 128-320 px scene sizes
PHOTOS = {  # file in skimage's data folder -> (origin, license), per the docstrings of skimage.data
    "astronaut.png": ("NASA Great Images database (Eileen Collins)", "public domain (NASA)"),
    "camera.png": ("Lav Varshney", "CC0 by the photographer"),
    "chelsea.png": ("Stefan van der Walt", "CC0 by the photographer"),
    "coffee.png": ("Rachel Michetti, courtesy of Pikolo Espresso Bar", "CC0 by the photographer"),
    "rocket.jpg": ("SpaceX, Falcon 9 launch", "released into the public domain by SpaceX"),
    "hubble_deep_field.jpg": ("NASA HubbleSite, eXtreme Deep Field", "public domain (NASA)"),
}
ANIMAL_MIT = """\
MIT License

Copyright (c) 2025 SinaSR-6

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


class ArrayUnpickler(pickle.Unpickler):
    """Animal-MNIST ships pickled numpy arrays: allow exactly what rebuilds a plain array."""

    ALLOWED = {("numpy.core.multiarray", "_reconstruct"), ("numpy", "ndarray"), ("numpy", "dtype")}

    def find_class(self, module: str, name: str):
        if (module, name) not in self.ALLOWED:
            raise pickle.UnpicklingError(f"unexpected object {module}.{name} in a data file")
        return super().find_class(module.replace("numpy.core", "numpy._core"), name)


def read_pickled_array(path: Path) -> np.ndarray:
    with gzip.open(path, "rb") as f:
        array = ArrayUnpickler(f).load()
    if not isinstance(array, np.ndarray):
        raise SystemExit(f"{path}: not an array")
    return array


def distinct_per_class(images: np.ndarray, labels: np.ndarray, classes: int, count: int) -> np.ndarray:
    """Per class, in file order, the indices of the first ``count`` images that differ from every
    earlier image and its mirror (Animal-MNIST repeats some silhouettes, some mirrored), so the
    training and validation pools share no image."""
    seen: set[bytes] = set()
    keep: list[list[int]] = [[] for _ in range(classes)]
    for i, (image, label) in enumerate(zip(images, labels.tolist())):
        key = min(image.tobytes(), np.ascontiguousarray(image[:, ::-1]).tobytes())
        if key in seen:
            continue
        seen.add(key)
        if len(keep[label]) < count:
            keep[label].append(i)
    if min(len(k) for k in keep) < count:
        raise SystemExit(f"fewer than {count} distinct images in some class")
    return np.array(keep, dtype=np.int64)  # (classes, count)


def build_clutter_objects(animal_dir: Path, digits_png: Path) -> tuple[dict[str, np.ndarray], list[str]]:
    animal_file, label_file = animal_dir / "animal_data_version_3.gz", animal_dir / "animal_label_version_3.gz"
    animals, animal_labels = read_pickled_array(animal_file), read_pickled_array(label_file)
    sheet = np.array(Image.open(digits_png).convert("L"))
    # 50 rows x 100 columns of 20x20 cells; each block of 5 rows is one digit, 0 to 9.
    digits = sheet.reshape(50, 20, 100, 20).transpose(0, 2, 1, 3).reshape(5000, 20, 20)
    digit_labels = np.repeat(np.arange(10), 500)
    total = CLUTTER_TRAIN_PER_CLASS + CLUTTER_VAL_PER_CLASS
    arrays: dict[str, np.ndarray] = {"classes": np.array(ANIMALS + DIGITS)}
    notes: list[str] = []
    for name, images, labels, names, source in (
        ("animals", animals, animal_labels, ANIMALS, f"{animal_file.name} (sha256 {sha256(animal_file)}), "
         f"labels from {label_file.name} (sha256 {sha256(label_file)})"),
        ("digits", digits, digit_labels, DIGITS, f"{digits_png.name} (sha256 {sha256(digits_png)}), "
         "cell i = row i // 100, column i % 100 of the 20x20 grid, label i // 500"),
    ):
        keep = distinct_per_class(images, labels, len(names), total)
        for split, columns in (("train", slice(0, CLUTTER_TRAIN_PER_CLASS)), ("val", slice(CLUTTER_TRAIN_PER_CLASS, total))):
            taken = keep[:, columns].reshape(-1)
            arrays[f"{name}_{split}_images"] = images[taken]
            arrays[f"{name}_{split}_labels"] = labels[taken].astype(np.int64)
            arrays[f"{name}_{split}_indices"] = taken
        notes.append(textwrap.fill(
            f"{name}: from {source}. Per class the first {total} images (file order) that repeat no "
            f"earlier image or its mirror; the first {CLUTTER_TRAIN_PER_CLASS} are the training pool, "
            f"the other {CLUTTER_VAL_PER_CLASS} the validation pool. Indices (0-based):", width=100))
        for c, class_name in enumerate(names):
            notes.append(textwrap.fill(f"{class_name}: {', '.join(str(i) for i in keep[c])}", width=100,
                                       subsequent_indent="    "))
        notes.append("")
    return arrays, notes


def build_photos(source: Path) -> tuple[dict[str, np.ndarray], list[str]]:
    arrays, notes = {}, []
    for file_name, (origin, license_) in PHOTOS.items():
        path = source / file_name
        photo = Image.open(path).convert("RGB")
        scale = PHOTO_SIDE / min(photo.size)
        if scale < 1:
            photo = photo.resize((round(photo.width * scale), round(photo.height * scale)), Image.LANCZOS)
        name = file_name.rsplit(".", 1)[0]
        arrays[name] = np.array(photo)
        notes.append(textwrap.fill(
            f"{name}: {file_name} from scikit-image's data folder (sha256 {sha256(path)}), shrunk to "
            f"{photo.width}x{photo.height} RGB (Lanczos); by {origin}; {license_}, per the docstring "
            f"of skimage.data.{name}.", width=100, subsequent_indent="    "))
    return arrays, notes


def notice(fashion_notes: list[str], texture_notes: list[str], clutter_notes: list[str],
           photo_notes: list[str]) -> str:
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
    clutter = ("\n== clutter_objects.npz: Animal-MNIST silhouettes and OpenCV handwritten digits ==\n"
               "Animal-MNIST 0.4 (PyPI package animal-mnist, https://pypi.org/project/animal-mnist/),\n"
               "10 classes of 28x28 animal silhouettes, released under the MIT license:\n\n" + ANIMAL_MIT +
               "\nDigits: samples/data/digits.png of OpenCV 4.6.0 (https://opencv.org), via the Debian\n"
               "package opencv-doc (examples/data/digits.png): 5,000 20x20 handwritten digits derived\n"
               "from MNIST (Y. LeCun, C. Cortes, C. J. C. Burges, after NIST Special Databases 1 and 3).\n"
               "OpenCV's files are licensed Apache-2.0 AND BSD-3-Clause (Debian's copyright file for\n"
               "opencv, 'Files: *'); https://www.apache.org/licenses/LICENSE-2.0\n\n")
    photos = ("\n== photos.npz: photographs from scikit-image ==\n"
              "Source: scikit-image (https://scikit-image.org) skimage/data; only images whose\n"
              "documented license is CC0 or public domain. Used as clutter backgrounds.\n")
    header = header.replace("(backgrounds).\n", "(backgrounds). Clutter scenes made by distill.data.clutter paste real\n"
                            "Animal-MNIST silhouettes and OpenCV handwritten digits onto crops of real\n"
                            "CC0 / public-domain photographs.\n")
    return (header + fashion + "\n".join(fashion_notes) + textures + "\n".join(texture_notes) + "\n"
            + clutter + "\n".join(clutter_notes) + photos + "\n".join(photo_notes) + "\n")


def find_package_folder(package: str, folder: str) -> Path:
    spec = importlib.util.find_spec(package)  # locate without importing (no package deps needed)
    if spec is None or not spec.submodule_search_locations:
        raise SystemExit(f"{package} not found: install it, or pass its data folder (see --help)")
    return Path(list(spec.submodule_search_locations)[0]) / folder


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--fashion-mnist", type=Path, default=Path("/usr/share/datasets/fashion-mnist"))
    parser.add_argument("--skimage-data", type=Path, default=None)
    parser.add_argument("--animal-mnist", type=Path, default=None,
                        help="folder with animal_data_version_3.gz (default: the installed animal_mnist)")
    parser.add_argument("--opencv-digits", type=Path,
                        default=Path("/usr/share/doc/opencv-doc/examples/data/digits.png"))
    parser.add_argument("--out", type=Path, default=Path(__file__).resolve().parent)
    args = parser.parse_args()
    skimage_data = args.skimage_data or find_package_folder("skimage", "data")
    fashion, fashion_notes = build_fashion(args.fashion_mnist)
    textures, texture_notes = build_textures(skimage_data)
    clutter, clutter_notes = build_clutter_objects(
        args.animal_mnist or find_package_folder("animal_mnist", "data/Animal_MNIST"), args.opencv_digits)
    photos, photo_notes = build_photos(skimage_data)
    save_npz(args.out / "fashion_mnist_subset.npz", fashion)
    save_npz(args.out / "textures.npz", textures)
    save_npz(args.out / "clutter_objects.npz", clutter)
    save_npz(args.out / "photos.npz", photos)
    (args.out / "NOTICE.txt").write_text(notice(fashion_notes, texture_notes, clutter_notes, photo_notes))
    for name in ("fashion_mnist_subset.npz", "textures.npz", "clutter_objects.npz", "photos.npz", "NOTICE.txt"):
        print(f"{args.out / name}: {(args.out / name).stat().st_size} bytes")


if __name__ == "__main__":
    main()
