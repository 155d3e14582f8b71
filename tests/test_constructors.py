"""Constructors a newcomer meets first: no silently ambiguous positional
argument, and ``help(Class.__init__)`` that shows negbatch's text, not
torch's or object's."""

from __future__ import annotations

import inspect
import pydoc

import numpy as np
import pytest
import torch

from negbatch import (
    GCBSampler,
    GlobalInfoNCE,
    GradCache,
    HardNegativeBatchSampler,
    InfoNCE,
    NoDuplicateBatchSampler,
    RandomBatchSampler,
    ReLIC,
    SigLIP,
)
from negbatch.sampling.epoch_sampler import EpochBatchSampler


@pytest.mark.parametrize(
    "make, shown",
    [
        (lambda: InfoNCE(16), "16"),
        (lambda: InfoNCE(0.1, 16), "0.1, 16"),
        (lambda: ReLIC(0.1), "0.1"),
        (lambda: ReLIC(0.1, 1.0, 8), "0.1, 1.0, 8"),
        (lambda: GlobalInfoNCE(100, 16), "16"),
    ],
    ids=["InfoNCE(16)", "InfoNCE(0.1, 16)", "ReLIC(0.1)", "ReLIC(0.1, 1.0, 8)", "GlobalInfoNCE(100, 16)"],
)
def test_positional_arguments_are_refused_with_what_to_write(make, shown):
    with pytest.raises(TypeError) as info:
        make()
    message = str(info.value)
    assert f"got {shown} by position" in message
    assert "temperature=" in message and "negatives=" in message  # what to write instead


@pytest.mark.parametrize("make, unknown, close", [
    (lambda: SigLIP(queue_size=16), "queue_size", None),   # another loss's option: SigLIP has no queue
    (lambda: InfoNCE(temprature=0.1), "temprature", "temperature"),
    (lambda: GlobalInfoNCE(10, gama=0.9), "gama", "gamma"),
], ids=["SigLIP(queue_size)", "InfoNCE(temprature)", "GlobalInfoNCE(gama)"])
def test_an_unknown_keyword_is_answered_with_what_the_loss_takes(make, unknown, close):
    """Python's refusal named the key only ("unexpected keyword argument"); it now lists what the loss takes."""
    with pytest.raises(TypeError, match=rf"has no argument '{unknown}'") as info:
        make()
    assert "it takes " in str(info.value) and "temperature, " in str(info.value)
    assert (f"did you mean '{close}'" in str(info.value)) == (close is not None)


def test_keywords_and_the_one_positional_num_samples_are_accepted():
    z1, z2 = torch.randn(6, 4), torch.randn(6, 4)
    assert InfoNCE(negatives=3)(z1, z2, generator=torch.Generator().manual_seed(0)).shape == ()
    assert InfoNCE(temperature=16.0).temperature == 16.0
    assert ReLIC(temperature=0.2, alpha=0.5).alpha == 0.5
    loss_fn = GlobalInfoNCE(10, temperature=0.3, negatives=2)
    assert (loss_fn.num_samples, loss_fn.temperature, loss_fn.negatives) == (10, 0.3, 2)
    assert GlobalInfoNCE(num_samples=10).num_samples == 10
    # The signature help() shows is the real one: keyword-only after num_samples.
    kinds = {name: p.kind for name, p in inspect.signature(GlobalInfoNCE.__init__).parameters.items()}
    assert kinds["num_samples"] == inspect.Parameter.POSITIONAL_OR_KEYWORD
    assert kinds["temperature"] == kinds["negatives"] == inspect.Parameter.KEYWORD_ONLY
    assert all(p.kind == inspect.Parameter.KEYWORD_ONLY
               for name, p in inspect.signature(InfoNCE.__init__).parameters.items() if name != "self")


@pytest.mark.parametrize(
    "cls",
    [InfoNCE, ReLIC, GlobalInfoNCE, GradCache, GCBSampler, HardNegativeBatchSampler, NoDuplicateBatchSampler,
     RandomBatchSampler, EpochBatchSampler],
)
def test_help_on_init_shows_our_text(cls):
    text = pydoc.render_doc(cls.__init__, renderer=pydoc.plaintext)
    assert "Initialize internal Module state" not in text  # torch.nn.Module's
    assert "Initialize self." not in text  # object's
    assert "see Parameters" in text
    assert "num_samples" in text or "keys" in text or "temperature" in text or "encoders" in text  # the signature


@pytest.mark.parametrize("make, name", [
    (lambda: InfoNCE(temperature=0.1, gather="no"), "gather"),
    (lambda: InfoNCE(temperature=0.1, normalize="no"), "normalize"),
    (lambda: InfoNCE(temperature=0.1, form="query_document", symmetric="no"), "symmetric"),
    (lambda: ReLIC(temperature=0.1, detach_target="no"), "detach_target"),
    (lambda: GlobalInfoNCE(10, temperature=0.1, sync_state="no"), "sync_state"),
    (lambda: RandomBatchSampler(10, 5, drop_last="no"), "drop_last"),
    (lambda: GCBSampler(print, 10, 5, shuffle_batches="no"), "shuffle_batches"),
    (lambda: GCBSampler(print, 10, 5, normalize="no"), "normalize"),
    (lambda: GradCache(torch.nn.Linear(2, 2), loss_fn=InfoNCE(), chunk_size=2, keep_last_graph="no"), "keep_last_graph"),
    (lambda: GradCache(torch.nn.Linear(2, 2), loss_fn=InfoNCE(), chunk_size=2, paired="no"), "paired"),
])
def test_a_flag_that_is_not_a_bool_is_refused(make, name):
    """A string such as 'no' is truthy: taken as it was, it switched the option on."""
    with pytest.raises(TypeError, match=f"{name} must be True or False, got 'no'"):
        make()


@pytest.mark.parametrize("rank", [1.7, 1.0, "1", True])
def test_a_samplers_rank_that_is_not_an_int_is_refused(rank):
    """int() read rank=1.7 as rank 1: the process then trained another rank's share, silently."""
    with pytest.raises(TypeError, match=f"rank must be an int .* got {rank!r}"):
        RandomBatchSampler(12, 6, num_replicas=3, rank=rank)
    assert RandomBatchSampler(12, 6, num_replicas=3, rank=np.int64(1)).rank == 1


def test_relic_alpha_must_be_finite():
    with pytest.raises(ValueError, match="alpha must be a finite float >= 0, got inf"):
        ReLIC(temperature=0.1, alpha=float("inf"))
