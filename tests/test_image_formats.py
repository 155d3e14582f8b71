"""RGB data sets read from their standard on-disk formats, written here in tiny size:
CIFAR-10/100 python batches (Python 2 pickles), STL-10 binaries, ImageFolder trees,
and a user's .npz/.npy arrays."""

import os
import pickle
import pickletools
import sys
import warnings

import numpy as np
import pytest
import torch

from _image_formats import (
    py2_pickle,
    stl_bytes,
    write_cifar10,
    write_cifar100,
    write_image_folder,
    write_stl10,
)
from negbatch.data import (
    DatasetDamagedError,
    DatasetNotFoundError,
    ImageFiles,
    load_arrays,
    load_cifar10,
    load_cifar100,
    load_dataset,
    load_image_folder,
    load_stl10,
    read_cifar_pickle,
)

pytest.importorskip("PIL")


# ------------------------------------------------------------------ CIFAR


def test_fixture_pickles_are_python2_style(tmp_path):
    write_cifar10(tmp_path)
    ops = {op.name for op, _, _ in pickletools.genops((tmp_path / "data_batch_1").read_bytes())}
    assert "SHORT_BINSTRING" in ops or "BINSTRING" in ops
    assert not ops & {"BINUNICODE", "SHORT_BINUNICODE"}  # Python 2 wrote no unicode here
    globals_ = [arg for op, arg, _ in pickletools.genops((tmp_path / "data_batch_1").read_bytes()) if op.name == "GLOBAL"]
    assert "numpy.core.multiarray _reconstruct" in globals_ and not any("codecs" in g for g in globals_)
    # What the format's own instructions say: load with encoding='bytes' -> bytes keys, 'latin1' -> str keys.
    with open(tmp_path / "data_batch_1", "rb") as f:
        assert b"data" in pickle.load(f, encoding="bytes")


@pytest.mark.parametrize("py2", [True, False], ids=["python2-str-keys-as-bytes", "python3-str-keys"])
def test_cifar10_values_and_layout(tmp_path, py2):
    ref = write_cifar10(tmp_path / "cifar-10-batches-py", per_batch=3, n_test=4, py2=py2)
    ds = load_cifar10(tmp_path)  # the parent folder, where the archive unpacked
    assert ds.name == "cifar10" and ds.source == str(tmp_path / "cifar-10-batches-py")
    assert ds.x_train.dtype == torch.uint8 and ds.x_train.shape == (15, 3, 32, 32)
    assert np.array_equal(ds.x_train.numpy(), ref["x_train"]) and np.array_equal(ds.x_test.numpy(), ref["x_test"])
    assert ds.y_train.dtype == torch.int64 and ds.y_train.tolist() == ref["y_train"].tolist()
    assert ds.y_test.tolist() == ref["y_test"].tolist()
    # orientation: the marker pixels of cifar_images (red top-left 255, blue bottom-right 0)
    assert (ds.x_train[:, 0, 0, 0] == 255).all() and (ds.x_train[:, 2, 31, 31] == 0).all()
    assert ds.classes[:2] == ("airplane", "automobile")
    assert load_dataset("cifar10", tmp_path / "cifar-10-batches-py").identity() == ds.identity()


def test_protocol_5_batches_load_and_a_build_opcode_changes_nothing_outside_the_file(tmp_path):
    """Protocol 5 rebuilds an array with numpy's _frombuffer (it was refused
    as damaged); BUILD on the admitted _codecs.encode set the defaults of the
    module's own function, for the rest of the process."""
    from negbatch.data import cifar

    data = np.arange(2 * 3072, dtype=np.uint8).reshape(2, 3072) % 251
    path = tmp_path / "batch5"
    path.write_bytes(pickle.dumps({"data": data, "labels": [3, 5]}, protocol=5))
    d = read_cifar_pickle(path)
    assert np.array_equal(d["data"], data) and d["labels"] == [3, 5]
    # _codecs.encode, then BUILD with slot state {"__defaults__": ("rot13",)} on it; the file's object is {}.
    build = (b"\x80\x02}q\x00c_codecs\nencode\nq\x01N}q\x02X\x0c\x00\x00\x00__defaults__q\x03X\x05\x00\x00\x00rot13"
             b"q\x04\x85q\x05s\x86q\x06b0.")
    (tmp_path / "build").write_bytes(build)
    read_cifar_pickle(tmp_path / "build")
    assert cifar._latin1_encode.__defaults__ == ("latin1",)
    assert read_cifar_pickle(path)["labels"] == [3, 5]


def test_python3_bytes_keys_are_decoded(tmp_path):
    # pickle.dumps(protocol=2) from Python 3 stores bytes through _codecs.encode: admitted for latin-1 only
    path = tmp_path / "batch"
    path.write_bytes(pickle.dumps({b"data": np.zeros((1, 3072), np.uint8), b"labels": [1]}, protocol=2))
    d = read_cifar_pickle(path)
    assert sorted(d) == ["data", "labels"] and d["data"].shape == (1, 3072)


@pytest.mark.parametrize("labels,count", [("fine", 100), ("coarse", 20)])
def test_cifar100_fine_and_coarse(tmp_path, labels, count):
    ref = write_cifar100(tmp_path, n_train=6, n_test=4)
    ds = load_cifar100(tmp_path, labels=labels)
    assert ds.x_train.shape == (6, 3, 32, 32) and ds.x_test.shape == (4, 3, 32, 32)
    assert np.array_equal(torch.cat([ds.x_train, ds.x_test]).numpy(), ref["x"])
    assert torch.cat([ds.y_train, ds.y_test]).tolist() == ref[labels].tolist()
    assert len(ds.classes) == count and ds.classes[0] == f"{labels}0"
    with pytest.raises(ValueError, match="labels must be 'fine'"):
        load_cifar100(tmp_path, labels="superclass")


class _RunsCommand:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_planted_pickle_is_refused_without_running(tmp_path):
    write_cifar10(tmp_path)
    marker = tmp_path / "pwned"
    (tmp_path / "data_batch_3").write_bytes(pickle.dumps({"data": _RunsCommand(marker), "labels": []}, protocol=2))
    with pytest.raises(DatasetDamagedError) as info:
        load_cifar10(tmp_path)
    message = str(info.value)
    assert "data_batch_3" in message and "system" in message and "refused" in message
    assert "cifar-10-python.tar.gz" in message
    assert not marker.exists()
    # builtins are refused too, at any protocol
    evil = tmp_path / "evil"
    evil.write_bytes(b"cbuiltins\neval\n(S'1+1'\ntR.")
    with pytest.raises(DatasetDamagedError, match="builtins.eval"):
        read_cifar_pickle(evil)
    codec = tmp_path / "codec"
    codec.write_bytes(pickle.dumps(b"x", protocol=2).replace(b"latin1", b"utf-16"))
    with pytest.raises(DatasetDamagedError, match="codec"):
        read_cifar_pickle(codec)


def test_cifar_missing_and_damaged_files_say_what_and_where(tmp_path):
    with pytest.raises(DatasetNotFoundError) as info:
        load_cifar10(tmp_path)
    message = str(info.value)
    assert str(tmp_path) in message and "data_batch_1" in message and "test_batch" in message
    assert "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz" in message
    with pytest.raises(DatasetNotFoundError, match="cifar-100-python.tar.gz"):
        load_cifar100(tmp_path)
    with pytest.raises(DatasetNotFoundError, match="does not exist"):
        load_cifar10(tmp_path / "nowhere")
    write_cifar10(tmp_path)
    raw = (tmp_path / "data_batch_2").read_bytes()
    (tmp_path / "data_batch_2").write_bytes(raw[: len(raw) // 2])
    with pytest.raises(DatasetDamagedError, match="data_batch_2"):
        load_cifar10(tmp_path)
    (tmp_path / "data_batch_2").write_bytes(py2_pickle({b"data": np.zeros((2, 100), np.uint8), b"labels": [0, 1]}))
    with pytest.raises(DatasetDamagedError, match=r"data_batch_2's 'data' should be a uint8 array \(n, 3072\)"):
        load_cifar10(tmp_path)
    (tmp_path / "data_batch_2").write_bytes(py2_pickle({b"data": np.zeros((2, 3072), np.uint8), b"labels": [0]}))
    with pytest.raises(DatasetDamagedError, match=r"2 int labels in 0\.\.9"):
        load_cifar10(tmp_path)
    # A label past the classes loaded as an 18-class set, its names dropped.
    (tmp_path / "data_batch_2").write_bytes(py2_pickle({b"data": np.zeros((2, 3072), np.uint8), b"labels": [0, 17]}))
    with pytest.raises(DatasetDamagedError, match=r"data_batch_2's 'labels' should hold 2 int labels in 0\.\.9"):
        load_cifar10(tmp_path)
    with pytest.raises(ValueError, match="cifar10.*needs data_dir.*cifar-10-python.tar.gz"):
        load_dataset("cifar10")


# ------------------------------------------------------------------ STL-10


def test_stl_fixture_writer_follows_the_column_major_definition():
    x = np.zeros((1, 3, 96, 96), np.uint8)
    x[0, 0, 0, 1] = 7  # row 0, column 1 of the red plane: byte 96 (column 1 starts after column 0's 96 rows)
    x[0, 1, 2, 0] = 9  # green plane, row 2, column 0: byte 96*96 + 2
    raw = stl_bytes(x)
    assert len(raw) == 3 * 96 * 96 and raw[96] == 7 and raw[96 * 96 + 2] == 9 and sum(raw) == 16


def test_stl10_orientation_labels_and_unlabeled(tmp_path):
    ref = write_stl10(tmp_path / "stl10_binary")
    ds = load_stl10(tmp_path)
    assert ds.x_train.shape == (3, 3, 96, 96) and ds.x_train.dtype == torch.uint8
    for split in ("train", "test", "unlabeled"):
        assert np.array_equal(getattr(ds, f"x_{split}").numpy(), ref[f"x_{split}"])
    # the asymmetric marker: the top row of red is 255, the left column (below the corner) 0
    assert (ds.x_train[:, 0, 0, :] == 255).all() and (ds.x_train[:, 0, 1:, 0] == 0).all()
    assert ds.y_train.tolist() == ref["y_train"].tolist() and ds.y_test.tolist() == ref["y_test"].tolist()
    assert ds.classes[0] == "airplane" and len(ds.classes) == 10
    no_unl = load_stl10(tmp_path, unlabeled=False)
    assert no_unl.x_unlabeled is None and torch.equal(no_unl.x_train, ds.x_train)
    images, labels = ds.pretraining_images()
    assert len(images) == 5 and labels.tolist() == ref["y_train"].tolist() + [-1, -1]
    assert torch.equal(images[3:], ds.x_unlabeled)


def test_stl10_missing_and_damaged(tmp_path):
    with pytest.raises(DatasetNotFoundError) as info:
        load_stl10(tmp_path)
    assert "unlabeled_X.bin" in str(info.value) and "stl10_binary.tar.gz" in str(info.value)
    write_stl10(tmp_path)
    (tmp_path / "unlabeled_X.bin").unlink()
    load_stl10(tmp_path, unlabeled=False)
    with pytest.raises(DatasetNotFoundError, match="lacks unlabeled_X.bin"):
        load_stl10(tmp_path)
    # A folder in a file's place was named as nothing: "lacks ." (until 2026-12-03).
    (tmp_path / "unlabeled_X.bin").mkdir()
    with pytest.raises(DatasetNotFoundError, match=r"lacks unlabeled_X.bin \(a folder there, not a file\)\. "):
        load_stl10(tmp_path)
    (tmp_path / "unlabeled_X.bin").rmdir()
    (tmp_path / "test_X.bin").write_bytes(b"\0" * 100)
    with pytest.raises(DatasetDamagedError, match="test_X.bin holds 100 bytes"):
        load_stl10(tmp_path, unlabeled=False)
    write_stl10(tmp_path)
    (tmp_path / "train_y.bin").write_bytes(bytes([1, 2]))
    with pytest.raises(DatasetDamagedError, match="train_y.bin should hold 3 labels"):
        load_stl10(tmp_path)
    (tmp_path / "train_y.bin").write_bytes(bytes([1, 11, 2]))  # the message said "holds 3" (the count was right)
    with pytest.raises(DatasetDamagedError, match=r"train_y.bin should hold 3 labels in 1..10 .*holds 3 in 1..11"):
        load_stl10(tmp_path)


# ------------------------------------------------------------------ ImageFolder


def test_image_folder_lazy_at_native_size(tmp_path):
    written = write_image_folder(tmp_path, size=(12, 10))
    ds = load_image_folder(tmp_path)
    assert isinstance(ds.x_train, ImageFiles) and ds.x_train.shape == (9, 3, 12, 10)
    assert ds.classes == ("a_cls", "b_cls", "c_cls") and ds.source == str(tmp_path)
    for split, x, y in (("train", ds.x_train, ds.y_train), ("val", ds.x_test, ds.y_test)):
        got = x[torch.arange(len(x))]
        for i, rel in enumerate(x.paths):
            label, array = written[rel]
            assert rel.startswith(split) and int(y[i]) == label
            assert np.array_equal(got[i].permute(1, 2, 0).numpy(), array)
    assert sorted(ds.y_train.tolist()) == [0, 0, 0, 1, 1, 1, 2, 2, 2]  # classes by sorted folder name
    # Shuffled (a fixed seed): a prefix holds more than the first class, and loading again gives the same order.
    assert len(set(ds.y_train[:3].tolist())) > 1 and len(set(ds.y_test[:3].tolist())) > 1
    assert list(load_image_folder(tmp_path).x_train.paths) == list(ds.x_train.paths)


def test_image_folder_tiny_imagenet_flat_val(tmp_path):
    written = write_image_folder(tmp_path, tiny_val=True, n_val=2)
    ds = load_image_folder(tmp_path, decode_size=8)
    assert ds.x_test.shape == (6, 3, 8, 8)
    assert [written[p][0] for p in ds.x_test.paths] == ds.y_test.tolist()
    (tmp_path / "val" / "val_annotations.txt").write_text("val_b_cls_0.png\tzzz\t0\t0\t1\t1\n")
    with pytest.raises(DatasetDamagedError, match=r"val_annotations.txt line 1: class 'zzz'"):
        load_image_folder(tmp_path)
    # One image listed twice (with two classes) would sit in val twice, with both labels.
    (tmp_path / "val" / "val_annotations.txt").write_text("val_b_cls_0.png\tb_cls\n\nval_b_cls_0.png\ta_cls\n")
    with pytest.raises(DatasetDamagedError, match=r"line 3 lists 'val_b_cls_0.png' again \(first on line 1\)"):
        load_image_folder(tmp_path)


@pytest.mark.skipif(not hasattr(os, "symlink") or sys.platform == "win32", reason="symbolic links")
def test_image_folder_follows_linked_folders_once(tmp_path):
    """A linked sub-folder of a class is read (it was skipped, silently),
    and a link back to an ancestor does not loop."""
    written = write_image_folder(tmp_path / "data")
    elsewhere = tmp_path / "elsewhere"
    extra = write_image_folder(elsewhere, classes=("a_cls",), per_class=2)
    (tmp_path / "data" / "train" / "a_cls" / "linked").symlink_to(elsewhere / "train" / "a_cls" / "images")
    (tmp_path / "data" / "train" / "a_cls" / "loop").symlink_to(tmp_path / "data" / "train" / "a_cls")
    ds = load_image_folder(tmp_path / "data")
    linked = sorted(p for p in ds.x_train.paths if "/linked/" in p)
    assert linked == ["train/a_cls/linked/a_cls_0.png", "train/a_cls/linked/a_cls_1.png"]
    assert len(ds.x_train) == sum(p.startswith("train/") for p in written) + 2
    got = ds.x_train[torch.tensor([ds.x_train.paths.index(linked[1])])][0].permute(1, 2, 0).numpy()
    assert np.array_equal(got, extra["train/a_cls/images/a_cls_1.png"][1])


def test_image_folder_different_sizes_need_a_decode_size(tmp_path):
    write_image_folder(tmp_path, vary_size=True)
    ds = load_image_folder(tmp_path)
    with pytest.raises(DatasetDamagedError, match="decode_size=, or size= to resize once; in the lab --decode-size or --image-size"):
        ds.x_train[torch.arange(9)]
    lazy = load_image_folder(tmp_path, decode_size=(6, 5))
    assert lazy.x_train[torch.arange(9)].shape == (9, 3, 6, 5)


def test_image_folder_resize_once_and_cache(tmp_path, monkeypatch):
    write_image_folder(tmp_path / "data", size=(12, 10))
    cache = tmp_path / "cache"
    ds = load_image_folder(tmp_path / "data", size=8, cache_dir=cache)
    assert ds.x_train.dtype == torch.uint8 and ds.x_train.shape == (9, 3, 8, 8)
    lazy = load_image_folder(tmp_path / "data", decode_size=8)
    assert torch.equal(ds.x_train, lazy.x_train[torch.arange(9)]) and torch.equal(ds.x_test, lazy.x_test[torch.arange(6)])
    files = list(cache.glob("negbatch-8px-*.npz"))
    assert len(files) == 1 and not list(cache.glob(".*tmp"))

    def no_decoding(self, i):
        raise AssertionError("the cache should have been used")

    monkeypatch.setattr(ImageFiles, "decode", no_decoding)
    again = load_image_folder(tmp_path / "data", size=8, cache_dir=cache)
    assert torch.equal(again.x_train, ds.x_train) and again.identity() == ds.identity()
    monkeypatch.undo()
    # a changed tree gets a new cache key (decoded again)
    from PIL import Image

    Image.fromarray(np.zeros((12, 10, 3), np.uint8)).save(tmp_path / "data" / "train" / "a_cls" / "new.png")
    grown = load_image_folder(tmp_path / "data", size=8, cache_dir=cache)
    assert grown.x_train.shape[0] == 10 and len(list(cache.glob("negbatch-8px-*.npz"))) == 2
    # a damaged cache file is rebuilt with a warning
    newest = max(cache.glob("negbatch-8px-*.npz"), key=lambda p: p.stat().st_mtime_ns)
    newest.write_bytes(b"garbage")
    with pytest.warns(UserWarning, match="cannot be read"):
        rebuilt = load_image_folder(tmp_path / "data", size=8, cache_dir=cache)
    assert torch.equal(rebuilt.x_train, grown.x_train)


def test_image_folder_cache_in_unwritable_place_warns(tmp_path):
    write_image_folder(tmp_path / "data")
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    with pytest.warns(UserWarning, match="cache_dir"):
        ds = load_image_folder(tmp_path / "data", size=4, cache_dir=blocker / "sub")
    assert ds.x_train.shape == (9, 3, 4, 4)


def test_image_folder_errors(tmp_path):
    with pytest.raises(DatasetNotFoundError, match="does not exist.*train/<class>.*tiny-imagenet-200.zip"):
        load_image_folder(tmp_path / "none")
    (tmp_path / "train").mkdir()
    with pytest.raises(DatasetNotFoundError, match="lacks val/"):
        load_image_folder(tmp_path)
    write_image_folder(tmp_path)
    (tmp_path / "val" / "stranger").mkdir()
    with pytest.raises(DatasetDamagedError, match="stranger.*no folder under"):
        load_image_folder(tmp_path)
    (tmp_path / "val" / "stranger").rmdir()
    with pytest.raises(ValueError, match="not both"):
        load_image_folder(tmp_path, size=8, decode_size=8)
    with pytest.raises(ValueError, match="size must be a positive int"):
        load_image_folder(tmp_path, size=0)
    bad = tmp_path / "train" / "a_cls" / "images" / "broken.png"
    bad.write_bytes(b"not a png")
    with pytest.raises(DatasetDamagedError, match="broken.png cannot be decoded"):  # the first image sets the size
        ImageFiles(tmp_path, ["train/a_cls/images/broken.png"])
    ds = load_image_folder(tmp_path, decode_size=8)
    with pytest.raises(DatasetDamagedError, match="broken.png cannot be decoded"):
        ds.x_train[torch.arange(len(ds.x_train))]


def test_image_files_fingerprint_tracks_files(tmp_path):
    write_image_folder(tmp_path)
    a = load_image_folder(tmp_path, decode_size=8).identity()
    assert a == load_image_folder(tmp_path, decode_size=8).identity()
    assert a != load_image_folder(tmp_path, decode_size=6).identity()
    first = tmp_path / "train" / "a_cls" / "images" / "a_cls_0.png"
    first.write_bytes(first.read_bytes() + b"\0")  # one byte more
    assert load_image_folder(tmp_path, decode_size=8).identity()["fingerprint"] != a["fingerprint"]
    assert a["splits"]["train"]["images"] == {"shape": [9, 3, 8, 8], "dtype": "uint8", "storage": "files"}


def test_greyscale_image_folder(tmp_path):
    write_image_folder(tmp_path)
    ds = load_image_folder(tmp_path, channels=1, decode_size=8)
    assert ds.x_train[torch.arange(2)].shape == (2, 1, 8, 8)


# ------------------------------------------------------------------ arrays


def test_npz_with_all_splits_keeps_uint8_and_accepts_channels_last(tmp_path):
    rng = np.random.default_rng(0)
    xtr = rng.integers(0, 256, (6, 8, 8, 3), dtype=np.uint8)  # (N, H, W, C)
    xte = rng.integers(0, 256, (2, 8, 8, 3), dtype=np.uint8)
    unl = rng.integers(0, 256, (4, 8, 8, 3), dtype=np.uint8)
    np.savez(tmp_path / "mine.npz", x_train=xtr, y_train=np.arange(6) % 2, x_test=xte, y_test=[0, 1], x_unlabeled=unl)
    ds = load_dataset("npz", tmp_path / "mine.npz")
    assert ds.name == "mine" and ds.source == str(tmp_path / "mine.npz")
    assert ds.x_train.dtype == torch.uint8 and ds.x_train.shape == (6, 3, 8, 8)
    assert np.array_equal(ds.x_train.numpy(), xtr.transpose(0, 3, 1, 2)) and ds.x_unlabeled.shape == (4, 3, 8, 8)
    assert ds.y_test.tolist() == [0, 1]


def test_npz_without_test_split_is_split_seeded_and_stratified(tmp_path):
    x = np.random.default_rng(1).random((40, 1, 5, 5)).astype(np.float32)
    y = np.arange(40) % 4
    np.savez(tmp_path / "a.npz", images=x, labels=y)
    a, b = load_arrays(tmp_path / "a.npz"), load_arrays(tmp_path / "a.npz")
    assert torch.equal(a.x_train, b.x_train) and len(a.x_test) == 8 and a.x_train.dtype == torch.float32
    assert sorted(a.y_test.tolist()) == [0, 0, 1, 1, 2, 2, 3, 3]
    rows = {tuple(r) for r in x.reshape(40, -1).tolist()}
    got = torch.cat([a.x_train, a.x_test]).reshape(40, -1).tolist()
    assert {tuple(r) for r in got} == rows  # a partition of the images


def test_npz_split_that_would_leave_a_side_empty_and_binary_images(tmp_path):
    np.savez(tmp_path / "few.npz", images=np.zeros((20, 1, 4, 4), np.float32), labels=np.arange(20) % 10)
    with pytest.raises(ValueError, match="leaves 20 training and 0 test images; store x_test and y_test"):
        load_arrays(tmp_path / "few.npz")  # 2 per class: 0.2 of each rounds to none
    np.savez(tmp_path / "bits.npz", images=np.eye(4, dtype=bool)[None].repeat(10, 0), labels=np.arange(10) % 2)
    ds = load_arrays(tmp_path / "bits.npz")
    assert ds.x_train.dtype == torch.uint8 and int(ds.x_train.max()) == 255 and int(ds.x_train.min()) == 0


def test_unlabeled_only_arrays(tmp_path):
    np.save(tmp_path / "u.npy", np.zeros((5, 3, 4, 4), np.uint8))
    ds = load_arrays(tmp_path / "u.npy")
    assert not ds.has_labels and ds.x_unlabeled.shape == (5, 3, 4, 4) and ds.x_train.shape == (0, 3, 4, 4)
    images, labels = ds.pretraining_images()
    assert images.shape[0] == 5 and (labels == -1).all()
    np.savez(tmp_path / "u.npz", images=np.zeros((5, 4, 4), np.uint8))
    assert load_arrays(tmp_path / "u.npz").x_unlabeled.shape == (5, 1, 4, 4)


def test_array_errors_name_the_file_and_key(tmp_path):
    p = tmp_path / "x.npz"
    np.savez(p, x_train=np.zeros((3, 4, 4)), y_train=[0, 1, 2], extra=[1])
    with pytest.raises(ValueError, match=r"x.npz holds unknown arrays \['extra'\]"):
        load_arrays(p)
    np.savez(p, x_train=np.full((3, 4, 4), 2.0), y_train=[0, 1, 2])
    with pytest.raises(ValueError, match=r"x.npz:x_train: float images must be finite and lie in \[0, 1\]"):
        load_arrays(p)
    np.savez(p, x_train=np.zeros((3, 4, 4)), y_train=[0, 1])
    with pytest.raises(ValueError, match="x.npz:y_train must be 3 non-negative integer labels"):
        load_arrays(p)
    np.savez(p, x_train=np.zeros((3, 4, 4)), y_train=np.array([0, 1, 2**63 + 5], dtype=np.uint64))  # would wrap negative
    with pytest.raises(ValueError, match="x.npz:y_train must be 3 non-negative integer labels"):
        load_arrays(p)
    np.save(tmp_path / "o.npy", np.array([{"a": 1}], dtype=object))
    with pytest.raises(DatasetDamagedError, match="object array"):
        load_arrays(tmp_path / "o.npy")
    (tmp_path / "bad.npz").write_bytes(b"PK garbage")
    with pytest.raises(DatasetDamagedError, match="bad.npz cannot be read"):
        load_arrays(tmp_path / "bad.npz")
    (tmp_path / "cut.npz").write_bytes(p.read_bytes()[:40])
    with pytest.raises(DatasetDamagedError, match="cut.npz cannot be read"):
        load_arrays(tmp_path / "cut.npz")
    with pytest.raises(DatasetNotFoundError, match="missing.npz does not exist"):
        load_arrays(tmp_path / "missing.npz")
    np.savez(p, x_train=np.zeros((3, 4, 4)), y_train=[0, 1, 2], x_test=np.zeros((1, 4, 4)))
    with pytest.raises(ValueError, match="x_test and y_test go together"):
        load_arrays(p)


def test_load_dataset_names_and_options(tmp_path):
    write_cifar100(tmp_path)
    assert load_dataset("cifar100", tmp_path, labels="coarse").name == "cifar100-coarse"
    with pytest.raises(TypeError, match="takes no options"):
        load_dataset("digits", labels="coarse")
    with pytest.raises(ValueError, match="unknown dataset 'svhn'.*cifar10.*imagefolder.*npz"):
        load_dataset("svhn")
    for name in ("stl10", "imagefolder", "npz"):
        with pytest.raises(ValueError, match=f"'{name}' needs data_dir"):
            load_dataset(name)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no deprecation warning from numpy's old module names
        load_cifar100(tmp_path)


def test_image_folder_cache_sees_new_pixels_of_the_same_size_and_16_bit_images_are_refused(tmp_path):
    from PIL import Image

    root = tmp_path / "data"
    for split, name in (("train", "a.bmp"), ("train", "b.bmp"), ("val", "c.bmp")):
        (root / split / "cls").mkdir(parents=True, exist_ok=True)
        Image.fromarray(np.full((8, 8, 3), 10, np.uint8)).save(root / split / "cls" / name)
    first = load_image_folder(root, size=8, cache_dir=tmp_path / "cache")
    target = root / "train" / "cls" / "a.bmp"
    size, stamp = target.stat().st_size, target.stat().st_mtime_ns
    Image.fromarray(np.full((8, 8, 3), 250, np.uint8)).save(target)  # an uncompressed file: the same size
    os.utime(target, ns=(stamp + 10**9, stamp + 10**9))  # a coarse file system may not tick within the test
    assert target.stat().st_size == size
    again = load_image_folder(root, size=8, cache_dir=tmp_path / "cache")
    assert sorted(int(x.max()) for x in again.x_train) == [10, 250] != sorted(int(x.max()) for x in first.x_train)
    assert len(list((tmp_path / "cache").glob("*.npz"))) == 1  # decoded into the same file, not beside it
    # A copy of the same files (new times) is the same data set: a run on it resumes.
    lazy = load_image_folder(root, decode_size=8).identity()
    os.utime(target, ns=(stamp + 2 * 10**9, stamp + 2 * 10**9))
    assert load_image_folder(root, decode_size=8).identity() == lazy
    Image.fromarray(np.full((8, 8), 40000, np.uint16)).save(root / "train" / "cls" / "deep.png")
    with pytest.raises(DatasetDamagedError, match="16-bit or float"):
        load_image_folder(root, size=8, cache_dir=tmp_path / "cache")


def test_npz_with_no_labelled_image_or_a_folder_is_named(tmp_path):
    np.savez(tmp_path / "e.npz", x_train=np.zeros((0, 4, 4), np.uint8), y_train=np.zeros(0, np.int64))
    with pytest.raises(ValueError, match="x_train holds no images"):
        load_arrays(tmp_path / "e.npz")
    (tmp_path / "d.npz").mkdir()
    with pytest.raises(DatasetNotFoundError, match="is a folder"):
        load_arrays(tmp_path / "d.npz")
