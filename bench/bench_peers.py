"""Forward + backward time of negbatch's losses against their peers (issue 15, item 3).

For 2B embeddings of width d (2B in {512, 2048, 8192}), every group of
variants is timed side by side in this one process, in a fresh random order
every round (bench/_order.py), and each of ours is reported as the median of
its times divided by the peer's median (``ours / peer``: <= 1.0 means ours is
never slower). The groups:

* the new losses against a peer or a hand-written version:
  SupCon (``InfoNCE(positives="mask")`` with labels) / pytorch-metric-learning's
  ``SupConLoss``; the queue (``InfoNCE(queue_size=Q)``) / PML's
  ``CrossBatchMemory`` (its memory holds the current batch too:
  ``memory_size = Q + 2B`` gives both the same candidates; every sample's
  label is its own index, so the other view is the one positive). Inside it,
  PML's ``SupConLoss``: with one positive per anchor it is NT-Xent, equal to
  ours in value to float32 rounding (not in gradient: see below). PML's ``NTXentLoss`` computes the same value but
  builds tables of (positive pair x negative pair): with Q = 4096 at 2B = 512
  one call took 13 s (empty queue) to 48 s (full) and 2.5 to 9 GB here, so it
  cannot run at these sizes (``--pml-ntxent`` times it at the smallest size);
  SigLIP / the dense sigmoid formula as open_clip writes it (open_clip is not
  installable here), its scale learned as open_clip learns it (the model
  passes ``exp(log_scale)``, the training loop clamps ``log_scale`` each
  step), as our SigLIP learns its own; DCL / a plain two-view DCL as lightly writes it (not
  installed either); the learnable temperature (symmetric query-document
  InfoNCE) / open_clip's ClipLoss formula with its learned scale (and, not a
  goal, / our fixed temperature: what learning it costs);
* the dense InfoNCE against the peers of the query-document form:
  info-nce-pytorch (``info_nce.InfoNCE``), sentence-transformers'
  ``MultipleNegativesRankingLoss`` (its own code, on precomputed embeddings),
  a hand-written cosine cross-entropy; the symmetric form against open_clip's
  ``ClipLoss`` formula; the two-view form against a plain NT-Xent;
* at 2B = 512: sampled ``negatives=K`` against ``negatives="all"`` in both
  forms (query-document also at B = 512);
* up to 2B = 2048: the dense group and SigLIP at CLIP's largest logit scale
  (tau = 0.01) on trained-like embeddings, where most softmax terms are
  below exp(-87) (the CPU's slow path for exp and subnormal numbers).

Before timing, each race checks once that its two sides compute the same
thing (bench/_agree.py): the same value, the same gradients of the
embeddings and of the parameters that correspond (a learned scale and bias),
and no gradient on one side only; the tau = 0.01 group checks on float64
copies (in float32 there both sides underflow to about zero). The queue's
race compares the values only: PML's memory keeps detached copies (the
current batch's too), so its gradient flows through the anchors alone, while
ours also flows through the current batch as candidates (SimCLR's gradient,
the backward's extra work on our side). A race whose sides differ stops the
bench.

Goals (issue 15): each new loss never slower than its peer; at 2B = 512,
sampled K never slower than all, and the dense InfoNCE at least level with the
fastest peer; from 2B = 2048 up, ahead of or level with every peer. A ratio
counts as met when it is at most ``1 + --tolerance`` (default 0.03: "level",
within the run-to-run spread of a median on a shared machine); the ratio is
printed either way.

``--keep-freed-memory`` races under ``negbatch.allocator.freed_memory_kept``. Without it, glibc
unmaps a freed block above its mmap threshold, so a peer's large B x B temporaries are faulted in
afresh on every call: a real cost in a default process, but not the algorithm's. At 2B = 8192 it
is most of our lead (docs/losses.md, "How much of the lead is the allocator's").

Usage: python bench/bench_peers.py [--sizes 512 2048 8192] [--dim 128] [--repeats 7] [--only new dense sampled scale]
       [--keep-freed-memory] [--quick]
"""

from __future__ import annotations

import argparse
import contextlib
import itertools
import math
import os
import statistics
import time
import warnings
from collections.abc import Callable

import torch
import torch.nn.functional as F

from _agree import check_same
from _order import rounds

import negbatch.negatives as negatives_module
from negbatch import DCL, InfoNCE, SigLIP
from negbatch.allocator import freed_memory_kept

Variant = Callable[[], torch.Tensor]


def load_average() -> str:
    try:
        with open("/proc/loadavg") as f:
            return " ".join(f.read().split()[:3])
    except OSError:
        return "n/a"


# ----------------------------------------------------------- hand-written peers


def plain_nt_xent(z1: torch.Tensor, z2: torch.Tensor, tau: float) -> torch.Tensor:
    """SimCLR's NT-Xent as a user would write it."""
    z = F.normalize(torch.cat([z1, z2]), dim=1)
    n = z1.shape[0]
    sim = (z @ z.t() / tau).fill_diagonal_(float("-inf"))
    target = torch.cat([torch.arange(n, 2 * n), torch.arange(n)])
    return F.cross_entropy(sim, target)


def cosine_cross_entropy(q: torch.Tensor, d: torch.Tensor, tau: float) -> torch.Tensor:
    """Query i against every document, document i positive."""
    logits = F.normalize(q, dim=1) @ F.normalize(d, dim=1).t() / tau
    return F.cross_entropy(logits, torch.arange(q.shape[0]))


def clip_formula(q: torch.Tensor, d: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """open_clip's ClipLoss (one process): the mean of the two directions."""
    q, d = F.normalize(q, dim=1), F.normalize(d, dim=1)
    per_query = scale * q @ d.t()
    target = torch.arange(q.shape[0])
    return (F.cross_entropy(per_query, target) + F.cross_entropy(per_query.t(), target)) / 2


def sigmoid_formula(q: torch.Tensor, d: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    """SigLIP's dense loss as open_clip writes it: +1 on the diagonal, -1 elsewhere."""
    q, d = F.normalize(q, dim=1), F.normalize(d, dim=1)
    n = q.shape[0]
    logits = scale * q @ d.t() + bias
    signs = 2 * torch.eye(n) - 1
    return -F.logsigmoid(signs * logits).sum() / n


def dcl_formula(z1: torch.Tensor, z2: torch.Tensor, tau: float) -> torch.Tensor:
    """Two-view DCL: each view's positive out of its log-sum-exp over the 2B - 2 negatives."""
    z = F.normalize(torch.cat([z1, z2]), dim=1)
    n = z1.shape[0]
    sim = z @ z.t() / tau
    partner = torch.cat([torch.arange(n, 2 * n), torch.arange(n)])
    rows = torch.arange(2 * n)
    positive = sim[rows, partner]
    outside = torch.eye(2 * n, dtype=torch.bool)
    outside[rows, partner] = True
    return (sim.masked_fill(outside, float("-inf")).logsumexp(dim=1) - positive).mean()


# ------------------------------------------------------------------- timing


def race(variants: dict[str, Variant], leaves: list[torch.Tensor], repeats: int) -> dict[str, float]:
    """Median seconds of forward + backward of each variant, in a fresh
    random order every round (see bench/_order.py; the first round warms up).
    In a fixed order the learnable temperature read 1.12-1.16x the fixed one,
    level when raced alone."""
    times: dict[str, list[float]] = {name: [] for name in variants}
    for rep, order in rounds(list(variants), repeats):
        for name in order:
            t0 = time.perf_counter()
            variants[name]().backward()
            elapsed = time.perf_counter() - t0
            for leaf in leaves:
                leaf.grad = None
            if rep:
                times[name].append(elapsed)
    return {name: statistics.median(ts) for name, ts in times.items()}


class Report:
    """Rows ``(goal, 2B, ours, peer, ratio)`` and their verdicts."""

    def __init__(self, tolerance: float) -> None:
        self.tolerance = tolerance
        self.rows: list[tuple[str, str, float, bool]] = []

    def add(self, goal: str, label: str, ratio: float) -> None:
        ok = ratio <= 1.0 + self.tolerance
        self.rows.append((goal, label, ratio, ok))
        print(f"  {label:<58} {ratio:>6.3f}  {'met' if ok else 'NOT met'}", flush=True)

    def summary(self) -> None:
        print()
        for goal in dict.fromkeys(goal for goal, *_ in self.rows):
            rows = [r for r in self.rows if r[0] == goal]
            misses = [f"{label} {ratio:.3f}" for _, label, ratio, ok in rows if not ok]
            worst = max(ratio for _, _, ratio, _ in rows)
            verdict = "met" if not misses else "NOT met (" + "; ".join(misses) + ")"
            print(f"goal {goal}: worst ratio {worst:.3f}: {verdict}")


def show(medians: dict[str, float]) -> None:
    for name, seconds in medians.items():
        print(f"    {name:<40} {1000 * seconds:>10.2f} ms")


def views(two_b: int, dim: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(two_b // 2, dim, generator=g, requires_grad=True),
            torch.randn(two_b // 2, dim, generator=g, requires_grad=True))


# ------------------------------------------------------------------- groups


def new_losses(two_b: int, args, report: Report) -> None:
    """Each new loss against its peer or a hand-written version."""
    import pytorch_metric_learning.losses as pml

    tau, dim = 0.1, args.dim
    z1, z2 = views(two_b, dim)
    n = two_b // 2
    g = torch.Generator().manual_seed(1)
    labels = torch.randint(0, args.classes, (n,), generator=g)
    both_labels = torch.cat([labels, labels])
    supcon, pml_supcon = InfoNCE(temperature=tau, positives="mask"), pml.SupConLoss(temperature=tau)

    queue_size = args.queue
    ours_queue = InfoNCE(temperature=tau, queue_size=queue_size)
    inner = pml.NTXentLoss(temperature=tau) if args.pml_ntxent else pml.SupConLoss(temperature=tau)
    pml_queue = pml.CrossBatchMemory(inner, embedding_size=dim, memory_size=queue_size + two_b)
    pml_name = f"queue {queue_size}: PML CrossBatchMemory({type(inner).__name__})"
    steps = itertools.count()

    def fresh_indices() -> torch.Tensor:  # no sample comes back: the queue holds negatives only
        return torch.arange(n) + n * next(steps)

    def run_ours_queue() -> torch.Tensor:
        return ours_queue(z1, z2, indices=fresh_indices())

    def run_pml_queue() -> torch.Tensor:
        idx = fresh_indices()
        return pml_queue(torch.cat([z1, z2]), torch.cat([idx, idx]))

    with torch.no_grad():  # fill both queues before timing
        for _ in range(-(-queue_size // two_b) + 1):
            run_ours_queue(), run_pml_queue()

    siglip = SigLIP(temperature=0.1, bias=-10.0)
    # open_clip's CLIP model keeps log(scale) and passes scale = exp(log_scale)
    # to the loss; its training loop clamps log_scale in place every step: the
    # formula pays for both, as our SigLIP does for its learnable scale.
    log_scale = torch.tensor(math.log(10.0), requires_grad=True)

    def run_sigmoid_formula() -> torch.Tensor:
        with torch.no_grad():
            log_scale.clamp_(0.0, math.log(100.0))
        return sigmoid_formula(z1, z2, log_scale.exp(), bias)

    bias = torch.tensor(-10.0, requires_grad=True)
    dcl = DCL(temperature=tau)
    # The learnable temperature's peer: open_clip's ClipLoss with the scale its
    # model learns (as above), against ours in the same symmetric form.
    clip_log_scale = torch.tensor(math.log(1.0 / tau), requires_grad=True)

    def run_clip_learned() -> torch.Tensor:
        with torch.no_grad():
            clip_log_scale.clamp_(0.0, math.log(100.0))
        return clip_formula(z1, z2, clip_log_scale.exp())

    symmetric = dict(temperature=tau, form="query_document", symmetric=True)
    fixed, learnable = InfoNCE(**symmetric), InfoNCE(**symmetric, learnable_temperature=True)

    variants = {
        "SupCon: negbatch positives='mask'": lambda: supcon(z1, z2, labels=labels),
        "SupCon: PML SupConLoss": lambda: pml_supcon(torch.cat([z1, z2]), both_labels),
        f"queue {queue_size}: negbatch": run_ours_queue,
        pml_name: run_pml_queue,
        "SigLIP: negbatch": lambda: siglip(z1, z2),
        "SigLIP: dense formula (open_clip's)": run_sigmoid_formula,
        "DCL: negbatch": lambda: dcl(z1, z2),
        "DCL: plain formula (lightly's)": lambda: dcl_formula(z1, z2, tau),
        "learnable temperature: negbatch symmetric": lambda: learnable(z1, z2),
        "learnable temperature: open_clip ClipLoss, learned scale": run_clip_learned,
    }
    leaves = [z1, z2, log_scale, bias, clip_log_scale, *siglip.parameters(), *learnable.parameters()]
    names = list(variants)
    # Which inputs and parameters correspond in each race (ours, the peer's): both
    # sides must give them the same gradients, and nothing else a gradient.
    views_only = ([z1, z2], [z1, z2])
    matched = [views_only, views_only,
               ([z1, z2, siglip.logit_scale.log_scale, siglip.bias], [z1, z2, log_scale, bias]),
               views_only, ([z1, z2, learnable.logit_scale.log_scale], [z1, z2, clip_log_scale])]
    goal = "each new loss never slower than its peer"
    for (ours, peer), (ours_leaves, peer_leaves) in zip(zip(names[::2], names[1::2]), matched):
        # The queue: the same value, not the same gradient. PML's memory keeps detached
        # copies, the current batch's among them, so its gradient flows through the
        # anchors only; ours also flows through the current batch as candidates (SimCLR's
        # gradient): ours does that backward's extra work.
        queue = ours == f"queue {queue_size}: negbatch"
        others = [t for t in leaves if all(t is not m for m in ours_leaves + peer_leaves)]
        print("    " + check_same(f"2B={two_b} {ours} / {peer.split(': ', 1)[1]}", variants[ours], variants[peer],
                                  ours_leaves, peer_leaves, others=others, gradients=not queue))
        medians = race({ours: variants[ours], peer: variants[peer]}, leaves, args.repeats)
        show(medians)
        report.add(goal, f"2B={two_b} {ours} / {peer.split(': ', 1)[1]}", medians[ours] / medians[peer])
    # Not a goal: what learning the temperature costs against a fixed one, in ours.
    medians = race({"learnable": lambda: learnable(z1, z2), "fixed": lambda: fixed(z1, z2)}, leaves, args.repeats)
    print(f"  2B={two_b} (cost of learning the temperature) learnable / fixed {medians['learnable'] / medians['fixed']:.3f}")


def softmax_variants(q: torch.Tensor, d: torch.Tensor, tau: float, clip_scale: torch.Tensor) -> dict:
    """Our dense InfoNCE (query-document, symmetric, two-view) and each one's
    peers on the pairs (q, d), as calls for :func:`race`."""
    import info_nce
    from sentence_transformers.sentence_transformer.losses import (
        MultipleNegativesRankingLoss,
    )

    ours = InfoNCE(temperature=tau, form="query_document")
    ours_sym = InfoNCE(temperature=tau, form="query_document", symmetric=True)
    ours_two_view = InfoNCE(temperature=tau)
    peer_info_nce = info_nce.InfoNCE(temperature=tau)
    mnrl = MultipleNegativesRankingLoss(torch.nn.Identity(), scale=1 / tau)  # the model is not called
    return {
        "negbatch query_document": lambda: ours(q, d),
        "info-nce-pytorch": lambda: peer_info_nce(q, d),
        "sentence-transformers MNRL": lambda: mnrl.compute_loss_from_embeddings([q, d], None),
        "hand-written cosine CE": lambda: cosine_cross_entropy(q, d, tau),
        "negbatch query_document symmetric": lambda: ours_sym(q, d),
        "open_clip ClipLoss formula": lambda: clip_formula(q, d, clip_scale),
        "negbatch two_view": lambda: ours_two_view(q, d),
        "plain NT-Xent": lambda: plain_nt_xent(q, d, tau),
    }


#: The races of :func:`softmax_variants`: (ours, peer, the ratio's label).
SOFTMAX_PAIRS = [
    ("negbatch query_document", "info-nce-pytorch", "query_document / info-nce-pytorch"),
    ("negbatch query_document", "sentence-transformers MNRL", "query_document / sentence-transformers MNRL"),
    ("negbatch query_document", "hand-written cosine CE", "query_document / hand-written cosine CE"),
    ("negbatch query_document symmetric", "open_clip ClipLoss formula", "symmetric / open_clip ClipLoss formula"),
    ("negbatch two_view", "plain NT-Xent", "two_view / plain NT-Xent"),
]


def check_softmax_pairs(variants: dict, q: torch.Tensor, d: torch.Tensor, others: list[torch.Tensor]) -> None:
    """Each race of :data:`SOFTMAX_PAIRS`: the same value and the same
    gradients of ``q`` and ``d``, and no gradient to any of ``others``."""
    for ours, peer, label in SOFTMAX_PAIRS:
        print("    " + check_same(label, variants[ours], variants[peer], [q, d], others=others))


def add_softmax_ratios(report: Report, goal: str, two_b: int, medians: dict) -> None:
    """Ours over each peer, for the calls of :func:`softmax_variants`."""
    for ours, peer, label in SOFTMAX_PAIRS:
        report.add(goal, f"2B={two_b} {label}", medians[ours] / medians[peer])


def dense_peers(two_b: int, args, report: Report) -> None:
    """The dense InfoNCE against the peers, query-document (B = 2B/2 pairs) and two-view."""
    tau = 0.05  # MNRL's scale 20
    q, d = views(two_b, args.dim, seed=2)
    # A fixed scale, as ours has a fixed temperature here (the learned one is
    # raced in new_losses). Until 2026-12-03 this scale required a gradient:
    # the peer computed d loss / d scale (one more pass over the B x B logits)
    # that ours did not.
    clip_scale = torch.tensor(1 / tau)
    variants = softmax_variants(q, d, tau, clip_scale)
    check_softmax_pairs(variants, q, d, [clip_scale])
    medians = race(variants, [q, d], args.repeats)
    show(medians)
    goal = (f"2B<{4 * args.sampled_at}: dense InfoNCE at least level with the fastest peer" if two_b < 4 * args.sampled_at
            else f"2B>={4 * args.sampled_at}: dense InfoNCE ahead of or level with every peer")
    add_softmax_ratios(report, goal, two_b, medians)


def trained_like(two_b: int, dim: int, seed: int = 5) -> tuple[torch.Tensor, torch.Tensor]:
    """Two views of B samples as a trained encoder gives them: each pair
    nearly equal (cosine about 0.99), other samples far apart."""
    g = torch.Generator().manual_seed(seed)
    base = torch.randn(two_b // 2, dim, generator=g)
    return tuple((base + 0.1 * torch.randn(base.shape, generator=g)).requires_grad_() for _ in range(2))


def high_scale(two_b: int, args, report: Report) -> None:
    """The dense losses and SigLIP at CLIP's largest logit scale (tau = 0.01,
    1/tau = 100) on trained-like embeddings: most softmax terms there are
    below exp(-87), where the CPU's exp and subnormal arithmetic are slow
    for every implementation; ours floors them (losses/_exp.py; SigLIP's
    softplus is not floored, docs/losses.md says why)."""
    tau = 0.01
    q, d = trained_like(two_b, args.dim)
    siglip = SigLIP(temperature=tau, bias=-10.0, learnable_temperature=False, learnable_bias=False)
    scale, bias = torch.tensor(1 / tau), torch.tensor(-10.0)
    variants = {
        **softmax_variants(q, d, tau, scale),
        "negbatch SigLIP": lambda: siglip(q, d),
        "SigLIP dense formula (open_clip's)": lambda: sigmoid_formula(q, d, scale, bias),
    }
    # The check runs on float64 copies: in float32 at this scale both sides' softmax
    # terms, values and gradients underflow to about zero, where agreement says nothing.
    q64, d64 = (t.detach().double().requires_grad_() for t in (q, d))
    scale64, bias64 = scale.double(), bias.double()
    check_softmax_pairs(softmax_variants(q64, d64, tau, scale64), q64, d64, [scale64, bias64])
    print("    " + check_same("SigLIP / dense formula (open_clip's)", lambda: siglip(q64, d64),
                              lambda: sigmoid_formula(q64, d64, scale64, bias64), [q64, d64], others=[scale64, bias64]))
    medians = race(variants, [q, d], args.scale_repeats)
    show(medians)
    goal = "tau=0.01 (trained-like embeddings): never slower than the peer"
    add_softmax_ratios(report, goal, two_b, medians)
    report.add(goal, f"2B={two_b} SigLIP / dense formula (open_clip's)",
               medians["negbatch SigLIP"] / medians["SigLIP dense formula (open_clip's)"])


@contextlib.contextmanager
def ranks_drawn_beforehand(ranks: dict[tuple[int, int], torch.Tensor]):
    """Inside: the loss's random ranks are a fixed table, drawn once before
    (its selection, logits and backward run as always): the sampled call
    without the draw, timed in the same race."""
    draw = negatives_module._draw_ranks

    def fixed(population, k, *args, **kwargs):
        # One table per raced variant (one loss, one form, one size): its
        # anchors and K name its draw.
        key = (population.shape[0], k)
        if key not in ranks:
            ranks[key] = draw(population, k, *args, **kwargs)
        return ranks[key]

    negatives_module._draw_ranks = fixed
    try:
        yield
    finally:
        negatives_module._draw_ranks = draw


def sampled_small(two_b: int, args, report: Report) -> None:
    """Sampled K against all at a small batch, in both forms; beside each K,
    the same call with its random ranks drawn beforehand (what the draw
    costs inside the loss, where it runs slower than alone: the backward
    before it leaves the caches cold)."""
    tau = 0.1
    gen = torch.Generator().manual_seed(3)
    goal = f"2B={two_b}: sampled K never slower than all"
    for form, rows in [("two_view", two_b // 2), ("query_document", two_b // 2), ("query_document", two_b)]:
        a, b = views(2 * rows, args.dim, seed=4)
        population = 2 * rows - 2 if form == "two_view" else rows - 1
        ks = [k for k in args.ks if k < population]
        full = InfoNCE(temperature=tau, form=form)
        variants = {"all": lambda loss=full, a=a, b=b: loss(a, b)}
        for k in ks:
            loss = InfoNCE(temperature=tau, form=form, negatives=k)
            variants[f"K={k}"] = lambda loss=loss, a=a, b=b: loss(a, b, generator=gen)
            fixed: dict = {}

            def predrawn(loss=loss, a=a, b=b, fixed=fixed):
                with ranks_drawn_beforehand(fixed):
                    return loss(a, b, generator=gen)

            variants[f"K={k}, ranks drawn beforehand"] = predrawn
        where = f"{form} B={rows}"
        print(f"  {where}")
        medians = race(variants, [a, b], args.repeats)
        show(medians)
        for k in ks:
            report.add(goal, f"{where} K={k} / all", medians[f"K={k}"] / medians["all"])
            rest = medians[f"K={k}, ranks drawn beforehand"]
            print(f"    of which the draw {(medians[f'K={k}'] - rest) / medians['all']:.3f} x all, "
                  f"the rest {rest / medians['all']:.3f} x all")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[512, 2048, 8192], help="2B values")
    parser.add_argument("--dim", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--ks", type=int, nargs="+", default=[16, 64, 128], help="sampled K at the smallest size")
    parser.add_argument("--queue", type=int, default=4096, help="queue size Q")
    parser.add_argument("--sampled-at", type=int, default=512, help="2B of the sampled-K-vs-all section")
    parser.add_argument("--only", nargs="+", choices=["new", "dense", "sampled", "scale"],
                        default=["new", "dense", "sampled", "scale"], help="the groups to run")
    parser.add_argument("--scale-repeats", type=int, default=5,
                        help="repeats of the tau = 0.01 group (its peers take about 1 s a call at 2B = 2048)")
    parser.add_argument("--scale-up-to", type=int, default=2048,
                        help="largest 2B of the tau = 0.01 group (at 8192 a peer's call takes about 15 s)")
    parser.add_argument("--classes", type=int, default=10, help="labels of the SupCon rows")
    parser.add_argument("--tolerance", type=float, default=0.03, help="a ratio <= 1 + tolerance is level")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--pml-ntxent", action="store_true",
                        help="the queue's peer: CrossBatchMemory(NTXentLoss) (GBs and seconds per call), smallest size only")
    parser.add_argument("--quick", action="store_true", help="tiny sizes, one repeat: a smoke run")
    parser.add_argument("--keep-freed-memory", action="store_true",
                        help="race under negbatch.allocator.freed_memory_kept (glibc: freed blocks stay in the "
                             "process, as in negbatch's training): the peers' large temporaries cost no page faults")
    args = parser.parse_args()
    if args.quick:
        args.sizes, args.repeats, args.ks, args.queue, args.classes = [32, 64], 1, [4, 8], 48, 4
        args.sampled_at, args.scale_repeats = 32, 1
    if args.pml_ntxent:
        args.sizes = [min(args.sizes)]
    torch.set_num_threads(args.threads)
    warnings.filterwarnings("ignore", category=DeprecationWarning)
    print(f"load average before: {load_average()}")
    with freed_memory_kept() if args.keep_freed_memory else contextlib.nullcontext() as kept:
        print(f"torch {torch.__version__}, threads {torch.get_num_threads()}, d={args.dim}, median of {args.repeats}, "
              f"level = ratio <= {1 + args.tolerance:.2f}; ratios are ours / peer; freed memory kept: {bool(kept)}")
        run_groups(args)
    print(f"load average after: {load_average()}")


def run_groups(args: argparse.Namespace) -> None:
    report = Report(args.tolerance)
    for two_b in args.sizes:
        if "new" in args.only:
            print(f"2B={two_b}: new losses vs peers")
            new_losses(two_b, args, report)
        if "dense" in args.only:
            print(f"2B={two_b}: dense InfoNCE vs peers")
            dense_peers(two_b, args, report)
        if "sampled" in args.only and two_b == args.sampled_at:
            print(f"2B={two_b}: sampled K vs all")
            sampled_small(two_b, args, report)
        if "scale" in args.only and two_b <= args.scale_up_to:
            print(f"2B={two_b}: at tau = 0.01 on trained-like embeddings")
            high_scale(two_b, args, report)
    report.summary()


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    main()
