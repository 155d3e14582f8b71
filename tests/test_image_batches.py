"""ImageDataset's storage forms, identity, and whole batches through a DataLoader."""

import json

import numpy as np
import pytest
import torch

from _image_formats import write_image_folder
from negbatch.data import (
    ImageBatches,
    ImageDataset,
    from_arrays,
    image_batch_loader,
    keep_batch,
    load_digits,
    load_image_folder,
    to_float_images,
)


def uint8_dataset(n_train=10, n_test=4, seed=0, name="toy"):
    g = torch.Generator().manual_seed(seed)
    x = torch.randint(0, 256, (n_train + n_test, 3, 6, 6), dtype=torch.uint8, generator=g)
    y = torch.arange(n_train + n_test) % 3
    return ImageDataset(name, x[:n_train], y[:n_train], x[n_train:], y[n_train:])


def test_constructor_validates_every_split():
    ds = uint8_dataset()
    with pytest.raises(TypeError, match="x_train must be float32 in \\[0, 1\\] or uint8"):
        ImageDataset("a", ds.x_train.double(), ds.y_train, ds.x_test, ds.y_test)
    with pytest.raises(ValueError, match="y_train must be an int64 tensor of shape \\(10,\\)"):
        ImageDataset("a", ds.x_train, ds.y_train[:3], ds.x_test, ds.y_test)
    with pytest.raises(ValueError, match="y_test must be an int64"):
        ImageDataset("a", ds.x_train, ds.y_train, ds.x_test, ds.y_test.int())
    with pytest.raises(ValueError, match="x_test images are \\(3, 5, 5\\) but x_train's are \\(3, 6, 6\\)"):
        ImageDataset("a", ds.x_train, ds.y_train, ds.x_test[:, :, :5, :5], ds.y_test)
    with pytest.raises(ValueError, match="x_unlabeled images are"):
        ImageDataset("a", ds.x_train, ds.y_train, ds.x_test, ds.y_test, x_unlabeled=ds.x_test[:, :1])
    with pytest.raises(TypeError, match="x_test must be a tensor"):
        ImageDataset("a", ds.x_train, ds.y_train, ds.x_test.numpy(), ds.y_test)


def test_subset_keeps_the_rest_and_checks_sizes():
    ds = uint8_dataset()
    full = ImageDataset("u", ds.x_train, ds.y_train, ds.x_test, ds.y_test, x_unlabeled=ds.x_train[:5],
                        source="/data/u", classes=("a", "b", "c"))
    sub = full.subset(3, 2, 4)
    assert sub.x_train.shape[0] == 3 and sub.x_test.shape[0] == 2 and sub.x_unlabeled.shape[0] == 4
    assert sub.source == "/data/u" and sub.classes == ("a", "b", "c")
    assert full.subset(3).x_unlabeled.shape[0] == 5
    with pytest.raises(ValueError, match="n_unlabeled=6 exceeds the 5 images of u's unlabeled split"):
        full.subset(n_unlabeled=6)
    with pytest.raises(ValueError, match="n_unlabeled=3 exceeds the 0 images"):
        ds.subset(n_unlabeled=3)


def test_identity_is_json_and_separates_contents_not_names():
    a, b = uint8_dataset(seed=0), uint8_dataset(seed=1)
    ia, ib = a.identity(), b.identity()
    json.dumps(ia)
    assert ia["name"] == ib["name"] == "toy" and ia["fingerprint"] != ib["fingerprint"]
    assert ia == uint8_dataset(seed=0).identity()
    assert ia["splits"]["train"] == {"images": {"shape": [10, 3, 6, 6], "dtype": "uint8", "storage": "tensor"},
                                     "labels": {"shape": [10], "dtype": "int64"}}
    # a label change, a split boundary change, the float form of the same images: all differ
    relabeled = ImageDataset("toy", a.x_train, (a.y_train + 1) % 3, a.x_test, a.y_test)
    moved = ImageDataset("toy", torch.cat([a.x_train, a.x_test[:1]]), torch.cat([a.y_train, a.y_test[:1]]),
                         a.x_test[1:], a.y_test[1:])
    floats = ImageDataset("toy", a.x_train.float() / 255, a.y_train, a.x_test.float() / 255, a.y_test)
    with_unl = ImageDataset("toy", a.x_train, a.y_train, a.x_test, a.y_test, x_unlabeled=a.x_test)
    prints = {d.identity()["fingerprint"] for d in (a, relabeled, moved, floats, with_unl)}
    assert len(prints) == 5
    # the digits: from_arrays with another name but the same arrays has the same fingerprint, another name
    digits = load_digits()
    renamed = from_arrays(digits.x_train.numpy(), digits.y_train.numpy(), digits.x_test.numpy(),
                          digits.y_test.numpy(), name="mydigits")
    assert renamed.identity()["fingerprint"] == digits.identity()["fingerprint"]
    assert renamed.identity()["name"] == "mydigits"


def test_from_arrays_accepts_rgb_and_unlabeled():
    x = np.random.default_rng(0).integers(0, 256, (7, 3, 4, 4), dtype=np.uint8)
    ds = from_arrays(x[:4], [0, 1, 0, 1], x[4:6], [1, 0], x_unlabeled=x[6:], source="/somewhere")
    assert ds.x_train.dtype == torch.float32 and ds.x_unlabeled.shape == (1, 3, 4, 4)
    assert torch.allclose(ds.x_train * 255, torch.from_numpy(x[:4]).float()) and ds.source == "/somewhere"
    with pytest.raises(ValueError, match="C = 1 or 3"):
        from_arrays(x[:4, :2], [0, 1, 0, 1], x[4:6, :2], [1, 0])


@pytest.mark.parametrize("num_workers", [0, 2])
@pytest.mark.parametrize("dtype", [torch.uint8, torch.float32])
def test_loader_gives_whole_batches_in_sampler_order(num_workers, dtype):
    ds = uint8_dataset(n_train=40)
    x = ds.x_train if dtype == torch.uint8 else ds.x_train.float() / 255
    batches = [[5, 1, 39], [0, 2, 4, 6], [7]]
    got = list(image_batch_loader(x, ds.y_train, batches, num_workers=num_workers))
    assert len(got) == 3
    for (images, labels, idx), want in zip(got, batches):
        assert idx.tolist() == want and images.dtype == dtype
        assert torch.equal(images, x[torch.tensor(want)]) and torch.equal(labels, ds.y_train[torch.tensor(want)])


def test_batched_fetch_is_one_call_per_batch():
    calls = []

    class Counting(ImageBatches):
        def __getitems__(self, indices):
            calls.append(list(indices))
            return super().__getitems__(indices)

    x = torch.zeros(20, 1, 2, 2)
    loader = torch.utils.data.DataLoader(Counting(x), batch_sampler=[[0, 1, 2], [3, 4]], collate_fn=keep_batch)
    assert [idx.tolist() for _, _, idx in loader] == [[0, 1, 2], [3, 4]]
    assert calls == [[0, 1, 2], [3, 4]]
    images, labels, idx = Counting(x)[7]
    assert images.shape == (1, 2, 2) and int(labels) == -1 and int(idx) == 7


@pytest.mark.parametrize("num_workers", [0, 2])
def test_image_files_decode_in_workers(tmp_path, num_workers):
    pytest.importorskip("PIL")
    write_image_folder(tmp_path)
    ds = load_image_folder(tmp_path, decode_size=8)
    want = ds.x_train[torch.arange(len(ds.x_train))]
    batches = [[8, 0], [3, 4, 5], [1]]
    got = list(image_batch_loader(ds.x_train, ds.y_train, batches, num_workers=num_workers))
    for (images, labels, idx), b in zip(got, batches):
        assert images.dtype == torch.uint8 and torch.equal(images, want[torch.tensor(b)])
        assert labels.tolist() == ds.y_train[torch.tensor(b)].tolist()


def test_image_files_slices_stay_lazy_and_join(tmp_path):
    pytest.importorskip("PIL")
    write_image_folder(tmp_path)
    ds = load_image_folder(tmp_path, decode_size=8)
    files = ds.x_train
    head = files[2:5]
    assert type(head) is type(files) and head.shape == (3, 3, 8, 8)
    assert torch.equal(head[torch.arange(3)], files[torch.arange(2, 5)])
    assert torch.equal(files[4], files[torch.tensor([4])][0])
    joined = files.concat(ds.x_test)
    assert len(joined) == 15 and torch.equal(joined[torch.tensor([9, 0])], torch.stack([ds.x_test[0], files[0]]))
    sub = ImageDataset("f", files, ds.y_train, ds.x_test, ds.y_test, x_unlabeled=ds.x_test).subset(4, 2)
    assert sub.x_train.shape == (4, 3, 8, 8)
    images, labels = sub.pretraining_images()
    assert len(images) == 10 and labels.tolist()[-6:] == [-1] * 6
    with pytest.raises(IndexError, match=r"indices must lie in \[0, 9\)"):
        files[torch.tensor([9])]


def test_pretraining_images_cannot_mix_storage(tmp_path):
    pytest.importorskip("PIL")
    write_image_folder(tmp_path)
    ds = load_image_folder(tmp_path, decode_size=8)
    mixed = ImageDataset("m", ds.x_train, ds.y_train, ds.x_test, ds.y_test,
                         x_unlabeled=torch.zeros(2, 3, 8, 8, dtype=torch.uint8))
    with pytest.raises(TypeError, match="mix a tensor and ImageFiles"):
        mixed.pretraining_images()


def test_to_float_images():
    x = torch.tensor([0, 1, 128, 255], dtype=torch.uint8).reshape(1, 1, 2, 2)
    y = to_float_images(x, "cpu")
    assert y.dtype == torch.float32 and torch.equal(y, x.double().div(255).float())
    f = torch.rand(2, 3, 4, 4)
    assert to_float_images(f) is f
    with pytest.raises(TypeError, match="uint8 in \\[0, 255\\] or float32"):
        to_float_images(f.double())
    with pytest.raises(ValueError, match="num_workers"):
        image_batch_loader(f, None, [[0]], num_workers=-1)
    with pytest.raises(ValueError, match="labels must be a tensor of shape \\(2,\\)"):
        ImageBatches(f, torch.zeros(3, dtype=torch.long))


def test_a_new_loader_iterator_leaves_torchs_global_generator_alone():
    # A resumed epoch makes one more iterator than an uninterrupted one: it must not draw from
    # the global generator (the checkpoint's RNG state differed after a resume).
    from negbatch.data import image_batch_loader

    loader = image_batch_loader(torch.rand(6, 1, 4, 4), None, [[0, 1, 2], [3, 4, 5]])
    before = torch.get_rng_state()
    assert [idx.tolist() for _, _, idx in loader] == [[0, 1, 2], [3, 4, 5]]
    assert torch.equal(torch.get_rng_state(), before)
