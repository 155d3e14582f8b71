"""Writers of tiny data sets in the RGB formats' exact on-disk layouts, for tests
(and for recipe smoke tests): CIFAR-10/100 python batches as Python 2 wrote
them, STL-10 binaries, ImageFolder trees.

Each writer follows the format's description, not negbatch's reader: the
CIFAR pickles are emitted with Python 2's string opcodes, the STL-10 bytes by
an explicit loop in the file's column-major order.
"""

from __future__ import annotations

import pickle
import struct
from pathlib import Path

import numpy as np


class Py2Pickler(pickle._Pickler):
    """Pickles as Python 2's cPickle did at protocol 2: every str and bytes as a
    Python 2 byte string (SHORT_BINSTRING / BINSTRING), numpy's reconstructor
    under its old module name ``numpy.core.multiarray``."""

    dispatch = pickle._Pickler.dispatch.copy()

    def save_py2_string(self, obj):
        data = obj.encode("latin1") if isinstance(obj, str) else obj
        if len(data) < 256:
            self.write(pickle.SHORT_BINSTRING + bytes([len(data)]) + data)
        else:
            self.write(pickle.BINSTRING + struct.pack("<i", len(data)) + data)
        self.memoize(obj)

    dispatch[str] = save_py2_string
    dispatch[bytes] = save_py2_string

    def save_global(self, obj, name=None):
        if getattr(obj, "__name__", None) == "_reconstruct":
            self.write(pickle.GLOBAL + b"numpy.core.multiarray\n_reconstruct\n")
            self.memoize(obj)
            return
        super().save_global(obj, name)


def py2_pickle(obj) -> bytes:
    import io

    buf = io.BytesIO()
    Py2Pickler(buf, protocol=2).dump(obj)
    return buf.getvalue()


def cifar_images(n: int, seed: int) -> np.ndarray:
    """n images uint8 (n, 3, 32, 32), each with an asymmetric marker: the
    top-left pixel's red value is 255 and the bottom-right's blue is 0."""
    x = np.random.default_rng(seed).integers(1, 255, (n, 3, 32, 32), dtype=np.uint8)
    x[:, 0, 0, 0] = 255
    x[:, 2, 31, 31] = 0
    return x


def _cifar_rows(x: np.ndarray) -> np.ndarray:
    # The format: per image 1024 red, 1024 green, 1024 blue bytes, each plane row by row.
    rows = np.empty((len(x), 3072), dtype=np.uint8)
    for i in range(len(x)):
        rows[i] = np.concatenate([x[i, c].reshape(-1) for c in range(3)])
    return rows


def write_cifar10(folder: Path, per_batch: int = 4, n_test: int = 5, seed: int = 0, *, py2: bool = True) -> dict:
    """A CIFAR-10 folder: data_batch_1..5, test_batch, batches.meta. Returns the
    images and labels written ({"x_train", "y_train", "x_test", "y_test"})."""
    folder.mkdir(parents=True, exist_ok=True)
    dump = py2_pickle if py2 else (lambda o: pickle.dumps(o, protocol=2))
    key = (lambda s: s.encode()) if py2 else (lambda s: s)
    x = cifar_images(5 * per_batch + n_test, seed)
    y = [int(v) for v in np.random.default_rng(seed + 1).integers(0, 10, len(x))]
    for b in range(5):
        sl = slice(b * per_batch, (b + 1) * per_batch)
        batch = {key("batch_label"): key(f"training batch {b + 1} of 5"), key("labels"): y[sl],
                 key("data"): _cifar_rows(x[sl]), key("filenames"): [key(f"img_{i}.png") for i in range(per_batch)]}
        (folder / f"data_batch_{b + 1}").write_bytes(dump(batch))
    test = {key("batch_label"): key("testing batch 1 of 1"), key("labels"): y[5 * per_batch:],
            key("data"): _cifar_rows(x[5 * per_batch:]), key("filenames"): [key("t.png")] * n_test}
    (folder / "test_batch").write_bytes(dump(test))
    names = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]
    meta = {key("num_cases_per_batch"): per_batch, key("label_names"): [key(s) for s in names], key("num_vis"): 3072}
    (folder / "batches.meta").write_bytes(dump(meta))
    return {"x_train": x[: 5 * per_batch], "y_train": np.array(y[: 5 * per_batch]),
            "x_test": x[5 * per_batch:], "y_test": np.array(y[5 * per_batch:])}


def write_cifar100(folder: Path, n_train: int = 6, n_test: int = 4, seed: int = 0, fine_classes: int = 100) -> dict:
    """A CIFAR-100 folder: train, test, meta (Python 2 pickles). The fine labels are drawn
    from the first ``fine_classes`` of the 100 (fewer: a cheaper linear probe)."""
    folder.mkdir(parents=True, exist_ok=True)
    x = cifar_images(n_train + n_test, seed)
    rng = np.random.default_rng(seed + 1)
    fine = [int(v) for v in rng.integers(0, fine_classes, len(x))]
    coarse = [int(v) for v in rng.integers(0, 20, len(x))]
    for name, sl in (("train", slice(0, n_train)), ("test", slice(n_train, None))):
        d = {b"filenames": [b"a.png"] * len(fine[sl]), b"batch_label": name.encode(), b"fine_labels": fine[sl],
             b"coarse_labels": coarse[sl], b"data": _cifar_rows(x[sl])}
        (folder / name).write_bytes(py2_pickle(d))
    meta = {b"fine_label_names": [f"fine{i}".encode() for i in range(100)],
            b"coarse_label_names": [f"coarse{i}".encode() for i in range(20)]}
    (folder / "meta").write_bytes(py2_pickle(meta))
    return {"x": x, "fine": np.array(fine), "coarse": np.array(coarse), "n_train": n_train}


def stl_bytes(x: np.ndarray) -> bytes:
    """STL-10's layout, by its definition: per image, per channel, column by
    column, row by row within a column (MATLAB's column-major order)."""
    n, c, h, w = x.shape
    out = bytearray()
    for i in range(n):
        for ch in range(c):
            plane = x[i, ch]
            for col in range(w):
                out += bytes(plane[:, col].tolist())
    return bytes(out)


def stl_images(n: int, seed: int) -> np.ndarray:
    """uint8 (n, 3, 96, 96) with an asymmetric marker: the top row of the red
    plane is 255, the left column of the red plane 0 (except the corner)."""
    x = np.random.default_rng(seed).integers(1, 255, (n, 3, 96, 96), dtype=np.uint8)
    x[:, 0, 0, :] = 255
    x[:, 0, 1:, 0] = 0
    return x


def write_stl10(folder: Path, n_train: int = 3, n_test: int = 2, n_unlabeled: int = 2, seed: int = 0) -> dict:
    folder.mkdir(parents=True, exist_ok=True)
    arrays = {"train": stl_images(n_train, seed), "test": stl_images(n_test, seed + 1),
              "unlabeled": stl_images(n_unlabeled, seed + 2)}
    labels = {"train": np.arange(n_train) % 10, "test": (np.arange(n_test) + 3) % 10}
    for split, x in arrays.items():
        (folder / f"{split}_X.bin").write_bytes(stl_bytes(x))
    for split, y in labels.items():
        (folder / f"{split}_y.bin").write_bytes(bytes((y + 1).tolist()))  # labels are stored 1..10
    (folder / "class_names.txt").write_text("\n".join(["airplane", "bird", "car", "cat", "deer", "dog", "horse",
                                                       "monkey", "ship", "truck"]) + "\n")
    return {**{f"x_{k}": v for k, v in arrays.items()}, **{f"y_{k}": v for k, v in labels.items()}}


def write_image_folder(root: Path, classes=("b_cls", "a_cls", "c_cls"), per_class: int = 3, n_val: int = 2,
                       size=(12, 10), seed: int = 0, tiny_val: bool = False, vary_size: bool = False) -> dict:
    """An ImageFolder tree of PNGs (lossless) under root/train and root/val.

    Images are (height, width) = size, or (with vary_size) a few pixels larger
    for some files. ``tiny_val``: Tiny-ImageNet's flat val/images with
    val_annotations.txt. Train images of Tiny-ImageNet live in
    train/<class>/images/: written so for every class.
    Returns {relative path: (label index, uint8 array (H, W, 3))}.
    """
    from PIL import Image

    rng = np.random.default_rng(seed)
    index = {c: i for i, c in enumerate(sorted(classes))}
    written = {}
    for c in classes:
        d = root / "train" / c / "images"
        d.mkdir(parents=True, exist_ok=True)
        for j in range(per_class):
            h, w = size
            if vary_size and j == 1:
                h, w = h + 4, w + 6
            a = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
            Image.fromarray(a).save(d / f"{c}_{j}.png")
            written[f"train/{c}/images/{c}_{j}.png"] = (index[c], a)
    lines = []
    for c in classes:
        for j in range(n_val):
            a = rng.integers(0, 256, (*size, 3), dtype=np.uint8)
            if tiny_val:
                d = root / "val" / "images"
                rel = f"val/images/val_{c}_{j}.png"
                lines.append(f"val_{c}_{j}.png\t{c}\t0\t0\t5\t5")
            else:
                d = root / "val" / c
                rel = f"val/{c}/{c}_{j}.png"
            d.mkdir(parents=True, exist_ok=True)
            Image.fromarray(a).save(root / rel)
            written[rel] = (index[c], a)
    if tiny_val:
        (root / "val" / "val_annotations.txt").write_text("\n".join(lines) + "\n")
    return written
