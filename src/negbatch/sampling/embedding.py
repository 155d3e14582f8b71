"""Embedding a whole data set with the current model, for samplers that plan
batches from embeddings (GCBS, hard-negative batches).

The user supplies ``embed_fn(indices) -> (X, Y)``: the anchor and positive
embeddings of the samples ``indices`` (a 1-d int64 tensor). It is called in
chunks, under ``torch.no_grad()``, with ``model`` (if given) in eval mode; the
model's previous train/eval mode is restored afterwards, even on error.
"""

from __future__ import annotations

import contextlib
from typing import Callable, Iterator

import numpy as np
import torch
from torch import Tensor

from .. import distributed as nbdist
from .._checks import check_positive_int

EmbedFn = Callable[[Tensor], "tuple[Tensor, Tensor] | Tensor"]

__all__ = ["EmbedFn", "embed_dataset", "eval_mode"]


@contextlib.contextmanager
def eval_mode(model: torch.nn.Module | None) -> Iterator[None]:
    """Put ``model`` (and its submodules) in eval mode and restore every
    submodule's own mode on exit (a frozen BatchNorm stays frozen)."""
    if model is None:
        yield
        return
    if not isinstance(model, torch.nn.Module):
        raise TypeError(f"model must be a torch.nn.Module or None, got {type(model).__name__}")
    modes = [(m, m.training) for m in model.modules()]
    model.eval()
    try:
        yield
    finally:
        for m, training in modes:
            m.training = training


def _progress(iterable, total: int, enabled: bool, desc: str):
    if not enabled:
        return iterable
    try:  # tqdm belongs to the lab's extra; the library works without it
        from tqdm.auto import tqdm
    except ImportError:
        return iterable
    return tqdm(iterable, total=total, desc=desc, leave=False)


def _check_chunk(out, n: int, two_sided: bool, check_finite: bool = True) -> tuple[Tensor, Tensor]:
    if isinstance(out, Tensor):
        if two_sided:
            raise TypeError("embed_fn must return a pair (X, Y) of tensors (anchors, positives), got one tensor")
        out = (out, out)
    if not (isinstance(out, (tuple, list)) and len(out) == 2 and all(isinstance(t, Tensor) for t in out)):
        raise TypeError(
            f"embed_fn must return a pair (X, Y) of tensors of shape (len(indices), d), got {type(out).__name__}"
        )
    x, y = out
    for name, t in (("X", x), ("Y", y)):
        if t.dim() != 2 or t.shape[0] != n:
            raise ValueError(
                f"embed_fn returned {name} of shape {tuple(t.shape)} for {n} indices; expected ({n}, d)"
            )
        if not t.is_floating_point():
            raise TypeError(f"embed_fn returned {name} with dtype {t.dtype}; expected a floating-point tensor")
        if check_finite and not bool(torch.isfinite(t).all()):
            raise ValueError(
                f"embed_fn returned NaN or inf in {name}; check the model (diverged training, fp16 overflow)"
            )
    if x.shape[1] != y.shape[1]:
        raise ValueError(f"embed_fn returned X and Y of different widths {x.shape[1]} and {y.shape[1]}")
    return x.detach(), y.detach()


def embed_dataset(
    embed_fn: EmbedFn,
    indices: np.ndarray | Tensor,
    *,
    model: torch.nn.Module | None = None,
    chunk_size: int = 1024,
    progress: bool = False,
    two_sided: bool = True,
    shard: bool = True,
) -> tuple[Tensor, Tensor]:
    """Embed the samples ``indices`` in chunks: eval mode, no gradients.

    Under ``torch.distributed`` (and ``shard=True``) every rank embeds a
    contiguous share of ``indices`` and the shares are gathered, so every rank
    returns the embeddings of all ``indices`` in their order. NaN or inf in
    any rank's share is found in the gathered embeddings: every rank raises,
    naming the samples and the rank that embedded them (a rank that raised
    alone would leave the others waiting in the gather).

    Parameters
    ----------
    embed_fn : callable
        ``embed_fn(idx)`` with ``idx`` a 1-d int64 tensor returns ``(X, Y)``,
        each of shape ``(len(idx), d)`` (or one tensor if ``two_sided=False``).
    indices : array of int
        Which samples to embed.
    model : torch.nn.Module, optional
        Switched to eval mode during the pass and restored afterwards.
    chunk_size : int
        Samples per call of ``embed_fn``.
    progress : bool
        Show a tqdm progress bar when tqdm is installed.
    two_sided : bool
        Whether ``embed_fn`` must return a pair.
    shard : bool
        Split the work across ranks under torch.distributed.

    Returns
    -------
    X, Y : Tensor
        ``(len(indices), d)`` each, detached.

    Examples
    --------
    >>> import torch
    >>> data = torch.randn(10, 4)
    >>> X, Y = embed_dataset(lambda i: (data[i], data[i] + 1), range(10), chunk_size=3)
    >>> X.shape
    torch.Size([10, 4])
    """
    chunk_size = check_positive_int(chunk_size, "chunk_size")
    idx = torch.as_tensor(np.asarray(indices, dtype=np.int64))
    world, rank = nbdist.world_size(), nbdist.rank()
    sharded = shard and world > 1
    mine = torch.tensor_split(idx, world)[rank] if sharded else idx
    xs: list[Tensor] = []
    ys: list[Tensor] = []
    chunks = list(torch.split(mine, chunk_size))
    with eval_mode(model), torch.no_grad():
        for chunk in _progress(chunks, len(chunks), progress, "embedding"):
            x, y = _check_chunk(embed_fn(chunk), len(chunk), two_sided, check_finite=not sharded)
            xs.append(x)
            ys.append(y)
    if not xs:  # this rank's share is empty: still take part in the gather
        probe_x, probe_y = _check_chunk(_probe(embed_fn, idx, model), 1, two_sided, check_finite=False)
        xs, ys = [probe_x[:0]], [probe_y[:0]]
    x, y = torch.cat(xs), torch.cat(ys)
    if sharded:
        x, y = nbdist.gather_nograd(x), nbdist.gather_nograd(y)
        _check_shares_finite(x, y, idx, world)
    return x, y


def _check_shares_finite(x: Tensor, y: Tensor, idx: Tensor, world: int) -> None:
    """NaN or inf in the gathered embeddings of every rank's share, on every
    rank alike: the samples and the rank that embedded them."""
    for name, t in (("X", x), ("Y", y)):
        bad = ~torch.isfinite(t).all(dim=1).cpu()
        if not bool(bad.any()):
            continue
        ranks = nbdist.rows_rank([len(share) for share in torch.tensor_split(idx, world)])[bad].unique().tolist()
        samples = idx[bad]
        raise ValueError(
            f"embed_fn returned NaN or inf in {name} for {len(samples)} sample(s) (e.g. indices "
            f"{samples[:5].tolist()}), embedded by {nbdist.name_ranks(ranks)} (every rank raises this error); check "
            "the model (diverged training, fp16 overflow)"
        )


def _probe(embed_fn: EmbedFn, idx: Tensor, model):
    with eval_mode(model), torch.no_grad():
        return embed_fn(idx[:1])
