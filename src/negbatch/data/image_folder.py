"""ImageFolder trees (ImageNet, ImageNet-100, Tiny-ImageNet) decoded with Pillow.

The layout::

    root/train/<class>/**/<image>     one folder per class; images anywhere below it
    root/val/<class>/**/<image>       the same classes (a subset is fine)

or, as Tiny-ImageNet ships it, ``root/val/images/<image>`` with
``root/val/val_annotations.txt`` (tab-separated: file name, class folder, ...).
ImageNet's own validation archive is flat with its labels in the devkit: sort
it into class folders first (the usual ``valprep.sh``). Classes are numbered by
the sorted names of the training class folders; each split's images are in an
order shuffled by a fixed seed, so that its first n images are a random subset.

Two ways to hold the images:

* ``size=64`` (an int): every image is decoded once, resized to size x size
  (Pillow's box filter, as the downsampled ImageNet of Chrabaszcz et al.,
  2017), and kept as a uint8 tensor; the array is cached in a ``.npz`` file
  next to the data (or in ``cache_dir``) so later runs read it back at once.
* no ``size``: :class:`ImageFiles`, decoded lazily batch by batch (in the
  DataLoader's workers) at ``decode_size`` — or at the images' own size when
  they all share one (Tiny-ImageNet's 64x64).
"""

from __future__ import annotations

import hashlib
import os
import warnings
from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from .._checks import is_int
from ._files import DatasetDamagedError, DatasetNotFoundError, atomic_write
from .image_files import IMAGE_EXTENSIONS, ImageFiles, _CACHE_VERSION, _side_pair
from .images import ImageDataset

_LAYOUT = (
    "expected root/train/<class>/<images> and root/val/<class>/<images> (ImageNet, ImageNet-100), "
    "or Tiny-ImageNet's root/val/images + root/val/val_annotations.txt"
)
_WHERE = (
    "ImageNet: https://image-net.org/download-images (sort its validation images into class folders); "
    "Tiny-ImageNet: http://cs231n.stanford.edu/tiny-imagenet-200.zip"
)


def _scan(folder: Path, root: Path) -> tuple[list[str], list[int], list[int]]:
    paths, sizes, times = [], [], []
    # Symbolic links to folders are followed (subsets of ImageNet are often built of them, and a
    # linked class folder itself is read), each real folder once: a link to an ancestor would loop.
    seen = set()
    for dirpath, dirnames, filenames in os.walk(folder, followlinks=True):
        real = os.path.realpath(dirpath)
        if real in seen:
            dirnames[:] = []
            continue
        seen.add(real)
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        base = Path(dirpath)
        for name in sorted(filenames):
            if name.startswith(".") or not name.lower().endswith(IMAGE_EXTENSIONS):
                continue
            p = base / name
            st = p.stat()
            paths.append(p.relative_to(root).as_posix())
            sizes.append(st.st_size)
            times.append(st.st_mtime_ns)  # for the decode cache, from the same stat
    return paths, sizes, times


def _class_folders(folder: Path) -> list[str]:
    return sorted(d.name for d in folder.iterdir() if d.is_dir() and not d.name.startswith("."))


def _tiny_imagenet_val(root: Path, index: dict[str, int]) -> tuple[list[str], list[int], list[int], list[int]]:
    ann = root / "val" / "val_annotations.txt"
    paths, sizes, times, labels = [], [], [], []
    listed: dict[str, int] = {}
    for lineno, line in enumerate(ann.read_text(errors="replace").splitlines(), 1):
        if not line.strip():
            continue
        fields = line.split("\t")
        if len(fields) < 2:
            raise DatasetDamagedError(f"{ann} line {lineno}: expected '<file>\\t<class folder>\\t...', got {line!r}")
        name, cls = fields[0].strip(), fields[1].strip()
        if cls not in index:
            raise DatasetDamagedError(f"{ann} line {lineno}: class {cls!r} has no folder under {root / 'train'}")
        p = root / "val" / "images" / name
        if not p.is_file():
            raise DatasetNotFoundError(f"{ann} line {lineno} names {p}, which does not exist")
        if name in listed:
            raise DatasetDamagedError(f"{ann} line {lineno} lists {name!r} again (first on line {listed[name]}); "
                                      "each validation image has one line")
        listed[name] = lineno
        st = p.stat()
        paths.append(p.relative_to(root).as_posix())
        sizes.append(st.st_size)
        times.append(st.st_mtime_ns)
        labels.append(index[cls])
    return paths, sizes, times, labels


def _decode_all(files: ImageFiles, num_workers: int, batch: int = 256) -> np.ndarray:
    from torch.utils.data import DataLoader

    from .batches import ImageBatches, keep_batch

    out = np.empty(files.shape, dtype=np.uint8)
    chunks = [list(range(s, min(s + batch, len(files)))) for s in range(0, len(files), batch)]
    loader = DataLoader(ImageBatches(files), batch_sampler=chunks, collate_fn=keep_batch, num_workers=num_workers)
    for x, _, idx in loader:
        out[idx.numpy()] = x.numpy()
    return out


def load_image_folder(
    root: str | os.PathLike,
    size: int | None = None,
    *,
    decode_size: int | Sequence[int] | None = None,
    cache_dir: str | os.PathLike | None = None,
    channels: int = 3,
    num_workers: int = 0,
    name: str = "imagefolder",
) -> ImageDataset:
    """An ImageFolder tree (see the module docstring for the layout).

    Parameters
    ----------
    root : path
        The folder holding ``train/`` and ``val/``.
    size : int, optional
        Decode every image once, resized to size x size, into uint8 tensors
        (the paper's ImageNet 64x64: ``size=64``), cached as
        ``negbatch-<size>px-<key>.npz`` in ``cache_dir`` (default: ``root``;
        when it is not writable the array is kept in memory only, with a
        warning). The key covers the file list, sizes and decoding, so a
        changed tree is decoded again.
    decode_size : int or (height, width), optional
        Without ``size``: the images stay files (:class:`ImageFiles`) decoded
        batch by batch at this size. None: at their own size, which must then
        be the same for all.
    cache_dir : path, optional
        Where the ``size`` cache goes.
    channels : {3, 1}, default 3
    num_workers : int, default 0
        Processes decoding the images for ``size`` (the first run only).
    name : str, default "imagefolder"

    Raises
    ------
    DatasetNotFoundError
        No ``train/`` or ``val/`` (the message gives the layout and where to get
        ImageNet / Tiny-ImageNet).
    DatasetDamagedError
        An image cannot be decoded (names the file).

    Examples
    --------
    See docs/images.md, which writes a tiny tree and loads it both ways.
    """
    root = Path(root).expanduser()
    if size is not None and decode_size is not None:
        raise ValueError("give size (resize once and cache) or decode_size (decode lazily), not both")
    if size is not None and (not is_int(size) or size < 1):
        raise ValueError(f"size must be a positive int (the side of the resized square images), got {size!r}")
    lazy_hw = _side_pair(decode_size, "decode_size")
    if not is_int(num_workers) or num_workers < 0:
        raise ValueError(f"num_workers must be an int >= 0, got {num_workers!r}")
    size, num_workers = (int(size) if size is not None else None), int(num_workers)
    if not (root / "train").is_dir() or not (root / "val").is_dir():
        missing = "does not exist" if not root.exists() else "lacks " + " and ".join(
            f"{d}/" for d in ("train", "val") if not (root / d).is_dir())
        raise DatasetNotFoundError(f"image folder not found: {root} {missing}; {_LAYOUT}. Get the data from {_WHERE}")
    classes = _class_folders(root / "train")
    if not classes:
        raise DatasetNotFoundError(f"{root / 'train'} has no class folders; {_LAYOUT}")
    index = {c: i for i, c in enumerate(classes)}

    train_paths, train_sizes, train_times, train_labels = [], [], [], []
    for c in classes:
        p, s, t = _scan(root / "train" / c, root)
        train_paths += p
        train_sizes += s
        train_times += t
        train_labels += [index[c]] * len(p)
    if not train_paths:
        raise DatasetNotFoundError(f"{root / 'train'} holds no image files ({', '.join(IMAGE_EXTENSIONS)}); {_LAYOUT}")

    if (root / "val" / "val_annotations.txt").is_file() and (root / "val" / "images").is_dir():
        val_paths, val_sizes, val_times, val_labels = _tiny_imagenet_val(root, index)
    else:
        val_paths, val_sizes, val_times, val_labels = [], [], [], []
        for c in _class_folders(root / "val"):
            if c not in index:
                raise DatasetDamagedError(f"{root / 'val' / c} is a class with no folder under {root / 'train'}; "
                                          "val/ must use the training classes' folder names")
            p, s, t = _scan(root / "val" / c, root)
            val_paths += p
            val_sizes += s
            val_times += t
            val_labels += [index[c]] * len(p)
    if not val_paths:
        raise DatasetNotFoundError(f"{root / 'val'} holds no image files; {_LAYOUT}")
    # The folders list the images class by class; shuffled (a fixed seed), a
    # prefix (ImageDataset.subset, the lab's --n-train / --n-test, the
    # embedding metrics on the first test images) is a random subset of every
    # class, not the first classes.
    train_paths, train_sizes, train_times, train_labels = _shuffled(train_paths, train_sizes, train_times,
                                                                    train_labels, seed=0)
    val_paths, val_sizes, val_times, val_labels = _shuffled(val_paths, val_sizes, val_times, val_labels, seed=1)

    hw = (size, size) if size is not None else lazy_hw
    train = ImageFiles(root, train_paths, size=hw, channels=channels, file_sizes=train_sizes)
    hw = hw if hw is not None else train.size
    resize = size is not None or lazy_hw is not None
    val = ImageFiles(root, val_paths, size=hw, channels=channels, file_sizes=val_sizes)
    val.resize = train.resize = resize
    y_train = torch.tensor(train_labels, dtype=torch.int64)
    y_val = torch.tensor(val_labels, dtype=torch.int64)
    if size is None:
        return ImageDataset(name, train, y_train, val, y_val, source=str(root), classes=tuple(classes))

    key = hashlib.sha256(
        f"v{_CACHE_VERSION}\0{train.fingerprint()}\0{val.fingerprint()}\0{classes}".encode()).hexdigest()[:16]
    cache = Path(cache_dir).expanduser() if cache_dir is not None else root
    cache_file = cache / f"negbatch-{size}px-{key}.npz"
    # The key is paths and sizes; the cache also records the files' modification times: an
    # uncompressed image rewritten with new pixels keeps its size, and such a cache (or one of
    # a fresh copy of the tree) is decoded again into the same file, not kept beside it.
    times = hashlib.sha256("\n".join(map(str, train_times + val_times)).encode()).hexdigest()
    arrays = _read_cache(cache_file, len(train), len(val), train.shape[1:], times)
    if arrays is None:
        arrays = {"x_train": _decode_all(train, num_workers), "x_test": _decode_all(val, num_workers),
                  "modification_times": np.array(times)}
        try:
            cache.mkdir(parents=True, exist_ok=True)
            atomic_write(cache_file, lambda f: np.savez(f, **arrays))
        except OSError as err:
            warnings.warn(f"could not write the decoded images to {cache_file} ({err}); they are decoded again next "
                          "time: pass cache_dir= a writable folder to keep them (negbatch train and study: "
                          "--image-cache-dir)", stacklevel=2)
    return ImageDataset(
        name,
        torch.from_numpy(arrays["x_train"]),
        y_train,
        torch.from_numpy(arrays["x_test"]),
        y_val,
        source=str(root),
        classes=tuple(classes),
    )


def _shuffled(*columns: list, seed: int) -> tuple[list, ...]:
    order = np.random.default_rng(seed).permutation(len(columns[0]))
    return tuple([column[i] for i in order] for column in columns)


def _read_cache(path: Path, n_train: int, n_val: int, chw: tuple, times: str) -> dict[str, np.ndarray] | None:
    if not path.is_file():
        return None
    try:
        with np.load(path, allow_pickle=False) as z:
            if "modification_times" not in z.files or str(z["modification_times"]) != times:
                return None  # files rewritten (or copied anew) since: decoded again
            arrays = {k: z[k] for k in ("x_train", "x_test")}
    except Exception as err:  # a damaged cache is rebuilt, not fatal
        warnings.warn(f"the image cache {path} cannot be read ({err}); decoding the images again", stacklevel=3)
        return None
    ok = (arrays["x_train"].shape == (n_train, *chw) and arrays["x_test"].shape == (n_val, *chw)
          and arrays["x_train"].dtype == np.uint8 and arrays["x_test"].dtype == np.uint8)
    if not ok:
        warnings.warn(f"the image cache {path} does not match the folder's images; decoding them again", stacklevel=3)
        return None
    return arrays
