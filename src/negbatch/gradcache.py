"""Gradient caching: contrastive batches larger than memory, with exact gradients.

Gao, Zhang, Han, Callan, "Scaling Deep Contrastive Learning Batch Size under
Memory Limited Setup" (2021). A contrastive loss couples every sample of the
batch, but the encoder's backward does not: by the chain rule,

    dL/dtheta = sum_i (dL/dz_i)^T dz_i/dtheta,

so once the gradients ``dL/dz_i`` of the loss with respect to the
representations are known, each chunk of the batch can be re-encoded and
back-propagated on its own (a vector-Jacobian product with the cached
gradients). Peak memory is one chunk's activation graph plus the
representations and the loss, whatever the batch size.

:class:`GradCache` runs the four steps of the algorithm:

1. :meth:`GradCache.forward_no_grad` encodes every chunk without a graph and
   records the random-number state of every device the chunk touches;
2. :meth:`GradCache.representation_gradients` computes the loss on all the
   representations and back-propagates it to the representations only;
3. :meth:`GradCache.backward_chunks` re-encodes each chunk with a graph under
   the replayed random state and back-propagates the cached gradients;
4. the caller's optimizer step (``optimizer.step()``, or ``scaler.step``).

:meth:`GradCache.step` chains steps 1-3.
"""

from __future__ import annotations

import contextlib
import inspect
import sys
import warnings
import weakref
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal, Union

import torch
from torch import Tensor, nn
from torch.nn.parallel import DistributedDataParallel

from ._autocast import autocast_state
from ._checks import check_flag, is_int

__all__ = ["GradCache", "CachedBatch"]

#: One encoder input: a tensor, a dict of tensors (a tokenizer's output, passed
#: as keyword arguments) or a list/tuple (passed as positional arguments) whose
#: items are tensors or dicts of tensors. Every tensor is split along dimension 0;
#: entries that hold no tensor (the ``"modality"`` string that sentence-transformers
#: puts in its features, a flag, None) are passed unchanged to every chunk.
EncoderInput = Union[Tensor, Mapping[str, Any], Sequence[Any]]
BatchNormPolicy = Literal["warn", "eval", "error"]


# ----------------------------------------------------------------------------
# Splitting inputs into chunks


def _holds_tensor(x: Any) -> bool:
    """Whether ``x`` is a tensor or a dict/list/tuple with a tensor somewhere inside.
    Anything else is a constant of the input, given as is to every chunk."""
    if isinstance(x, Tensor):
        return True
    if isinstance(x, Mapping):
        return any(_holds_tensor(v) for v in x.values())
    if isinstance(x, (list, tuple)):
        return any(_holds_tensor(v) for v in x)
    return False


def _check_constant(x: Any, name: str) -> None:
    """Refuse row data that would silently reach every chunk whole: an array of
    another library (NumPy, say) is per-row data, not a constant."""
    if (hasattr(x, "__array__") or hasattr(x, "__array_interface__")) and getattr(x, "ndim", 0) >= 1:
        raise TypeError(
            f"{name} is a {type(x).__name__}: row data must be torch tensors (split by rows), e.g. a tokenizer "
            f"called with return_tensors='pt'"
        )


def _leaves(x: Any, name: str) -> list[tuple[str, Tensor]]:
    """Every tensor of an input with its place (``input 0[1]['ids']``); nested
    dicts and lists/tuples are walked, entries without a tensor are skipped."""
    if isinstance(x, Tensor):
        if x.dim() == 0:
            raise ValueError(f"{name} is a 0-d tensor; it needs a batch dimension (dimension 0)")
        return [(name, x)]
    if isinstance(x, Mapping):
        items = [(f"{name}[{k!r}]", v) for k, v in x.items()]
    elif isinstance(x, (list, tuple)):
        items = [(f"{name}[{i}]", v) for i, v in enumerate(x)]
    else:
        _check_constant(x, name)
        return []
    return [leaf for key, value in items for leaf in _leaves(value, key)]


def _batch_length(x: EncoderInput, name: str) -> int:
    leaves = _leaves(x, name)
    if not leaves:
        raise TypeError(
            f"{name} holds no tensor: it must be a tensor, a dict of tensors or a list/tuple of tensors or dicts "
            f"(entries without a tensor, such as a tokenizer's 'modality' string, are passed unchanged to every "
            f"chunk), got {type(x).__name__}"
        )
    lengths = {key: t.shape[0] for key, t in leaves}
    if len(set(lengths.values())) != 1:
        raise ValueError(f"the tensors of {name} must share their batch length (dimension 0), got {lengths}")
    return next(iter(lengths.values()))


def _split(x: Any, size: int) -> list[Any]:
    """The chunks of an input: the same structure, every tensor cut into rows,
    every entry without a tensor repeated as is in each chunk."""
    first = _tensors(x)[0]
    return _split_into(x, size, len(first.split(size)))


def _split_into(x: Any, size: int, n: int) -> list[Any]:
    if isinstance(x, Tensor):
        return list(x.split(size))
    if not _holds_tensor(x):
        return [x] * n
    if isinstance(x, Mapping):
        parts = {k: _split_into(v, size, n) for k, v in x.items()}
        return [{k: v[i] for k, v in parts.items()} for i in range(n)]
    parts = [_split_into(v, size, n) for v in x]
    return [[p[i] for p in parts] for i in range(n)]


def _tensors(x: Any) -> list[Tensor]:
    if isinstance(x, Tensor):
        return [x]
    if isinstance(x, Mapping):
        values = x.values()
    elif isinstance(x, (list, tuple)):
        values = x
    else:
        return []
    return [t for v in values for t in _tensors(v)]


def _carries_graph(x: EncoderInput) -> bool:
    """Whether an input hangs on an upstream graph (an output of a trainable
    module, not a leaf): every chunk's backward then passes through it."""
    return any(t.grad_fn is not None for t in _tensors(x))


def _trainable(module: nn.Module) -> bool:
    return any(p.requires_grad for p in module.parameters())


def _call(encoder: nn.Module, chunk: EncoderInput) -> Any:
    if isinstance(chunk, Tensor):
        return encoder(chunk)
    if isinstance(chunk, Mapping):
        return encoder(**chunk)
    # A dict argument is given as a copy: an encoder that writes its outputs into the
    # dict it receives (sentence-transformers' modules do) would otherwise leave the
    # first pass's activations in the cached chunk until the second pass.
    return encoder(*(dict(item) if isinstance(item, Mapping) else item for item in chunk))


def _accepts_keyword(fn: Callable[..., Any], name: str) -> bool:
    """Whether ``fn`` (a module: its ``forward``) has a parameter ``name``
    that can be passed by keyword (``**kwargs`` does not count)."""
    try:
        parameter = inspect.signature(fn.forward if isinstance(fn, nn.Module) else fn).parameters.get(name)
    except (TypeError, ValueError):  # no signature (a builtin)
        return False
    return parameter is not None and parameter.kind in (parameter.POSITIONAL_OR_KEYWORD, parameter.KEYWORD_ONLY)


def _stacklevel_outside_this_module() -> int:
    """``stacklevel`` for ``warnings.warn`` that names the caller's line, not ours."""
    level, frame = 1, sys._getframe(1)
    while frame is not None and frame.f_code.co_filename == __file__:
        level, frame = level + 1, frame.f_back
    return level


#: BatchNorm layers already warned about (one warning per layer, whichever
#: GradCache meets it: the lab builds a new one every step).
_WARNED_BATCHNORM: "weakref.WeakSet[nn.Module]" = weakref.WeakSet()


# ----------------------------------------------------------------------------
# Random state of every device a chunk touches


@dataclass
class _RngState:
    cpu: Tensor
    cuda: dict[int, Tensor]

    @classmethod
    def capture(cls, cuda_devices: list[int]) -> "_RngState":
        return cls(torch.get_rng_state(), {d: torch.cuda.get_rng_state(d) for d in cuda_devices})

    @contextlib.contextmanager
    def replay(self):
        # fork_rng restores the states on exit: the replay leaves the random
        # streams where the first pass left them, as a plain step would.
        with torch.random.fork_rng(devices=list(self.cuda), device_type="cuda"):
            torch.set_rng_state(self.cpu)
            for device, state in self.cuda.items():
                torch.cuda.set_rng_state(state, device)
            yield


def _ambient_autocast() -> list[tuple[str, bool, torch.dtype]]:
    """The autocast state here, on or off (CPU, and CUDA where there is one): the
    second pass re-enters it both ways."""
    types = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    return [(t, *autocast_state(t)) for t in types]


@contextlib.contextmanager
def _reentered(regions: list[tuple[str, bool, torch.dtype]]):
    with contextlib.ExitStack() as stack:
        for device_type, enabled, dtype in regions:
            stack.enter_context(torch.autocast(device_type, dtype=dtype, enabled=enabled))
        yield


def _cuda_devices(encoder: nn.Module, chunk: EncoderInput) -> list[int]:
    """CUDA devices whose generators the forward of ``chunk`` may draw from:
    those of the inputs, of the encoder's parameters and buffers, and the
    current device (where a module creates its own random tensors even when
    the inputs are on the CPU or are not tensors at all)."""
    if not torch.cuda.is_available() or not torch.cuda.is_initialized():
        return []
    devices = {torch.cuda.current_device()}
    for t in [*_tensors(chunk), *encoder.parameters(), *encoder.buffers()]:
        if t.is_cuda:
            devices.add(t.device.index if t.device.index is not None else torch.cuda.current_device())
    return sorted(devices)


def _unreplayed_device_types(encoder: nn.Module, chunk: EncoderInput) -> list[str]:
    """Device types of the chunk's inputs and the encoder's tensors whose
    random numbers the replay does not restore (all but CPU and CUDA)."""
    tensors = [*_tensors(chunk), *encoder.parameters(), *encoder.buffers()]
    return sorted({t.device.type for t in tensors} - {"cpu", "cuda"})


#: Encoders already warned that their device's random numbers are not replayed.
_WARNED_DEVICE: "weakref.WeakSet[nn.Module]" = weakref.WeakSet()


def _warn_unreplayed_devices(encoder: nn.Module, chunk: EncoderInput) -> None:
    # On such a device a dropout mask drawn in the first pass is drawn afresh
    # in the second, and the gradient silently stops being the plain step's.
    if not encoder.training or encoder in _WARNED_DEVICE:
        return
    kinds = _unreplayed_device_types(encoder, chunk)
    if kinds:
        _WARNED_DEVICE.add(encoder)
        warnings.warn(
            f"GradCache replays the random numbers of CPU and CUDA only; this encoder runs on {', '.join(kinds)}, "
            "where random draws in its forward (dropout, augmentation inside the encoder) differ between the two "
            "passes, so the gradient is not the plain step's. Exact there: an encoder whose training forward draws "
            "no random numbers, or eval mode",
            UserWarning, stacklevel=_stacklevel_outside_this_module(),
        )


# ----------------------------------------------------------------------------


@dataclass
class CachedBatch:
    """What the first pass leaves for the next steps (see :class:`GradCache`).

    ``representations[i]`` is the detached (B_i, d_i) output for input i,
    ``chunks[i]`` its chunks, ``rng[i]`` the random state before each chunk's
    forward, ``kept`` the output with graph of the last chunk (keep-last
    option) and ``gradients[i]`` the cached dL/dz (after step 2; None for an
    input that needs no backward: a frozen encoder whose embeddings the loss
    does not differentiate). ``carries_graph``: some input hangs on an upstream
    graph, which every chunk's backward passes through (so it is retained).
    ``autocast``: the autocast regions around the first pass, which the second
    pass re-enters wherever it runs (a trainer's backward is outside them).
    ``backward_done``: step 3 ran (its gradients are then released), so that
    neither step 2 nor step 3 adds the batch's gradient a second time.
    ``versions``: the in-place version of every trainable parameter and every
    input tensor after step 1; step 3 refuses to re-encode if one changed (an
    optimizer step, or a reused input buffer, between the passes).
    """

    chunks: list[list[EncoderInput]]
    representations: list[Tensor]
    rng: list[list[_RngState | None]]
    kept: Tensor | None = None
    gradients: list[Tensor | None] = field(default_factory=list)
    bn_snapshot: list[tuple[Tensor, Tensor]] = field(default_factory=list)
    carries_graph: bool = False
    autocast: list[tuple[str, bool, torch.dtype]] = field(default_factory=list)
    backward_done: bool = False
    versions: list[tuple[str, Tensor, int]] = field(default_factory=list)


class GradCache:
    """Gradient caching for one or several encoders and any loss over their
    embeddings (Gao et al. 2021): the parameter gradient of the full batch,
    with the memory of one chunk.

    Parameters
    ----------
    encoders : nn.Module or sequence of nn.Module
        One module shared by every input (e.g. both views of SimCLR), or one
        module per input (e.g. a query and a document tower; the same module
        may appear twice). Modules may be wrapped in
        ``DistributedDataParallel``.
    loss_fn : callable
        ``loss_fn(z_1, ..., z_n, **loss_kwargs) -> scalar tensor``: any loss
        over the embeddings, e.g. :class:`negbatch.InfoNCE` or
        :class:`negbatch.ReLIC` in any negatives mode, or a user's function.
        Trainable tensors of the loss itself get their gradient in step 2.
    chunk_size : int or sequence of int
        Rows per chunk, one value for all inputs or one per input. The chunks
        need not divide the batch (the last chunk is smaller).
    output_fn : callable, optional
        Maps the encoder's output to the (chunk, d) embedding tensor (e.g.
        ``lambda out: out.pooler_output``). Default: the output itself.
    keep_last_graph : bool, default False
        Keep the graph of the last chunk of the last input from the first pass
        instead of re-encoding it (saves one chunk's forward, holds one
        chunk's graph through the loss; the gradient is unchanged).
    paired : bool, default True
        The loss pairs inputs 0 and 1 row by row: their batch lengths must be
        equal (checked before any forward).
    scaler : torch.amp.GradScaler, optional
        Mixed precision: the loss is scaled once, in step 2; the cached
        gradients carry the scale into the parameters. Call
        ``scaler.step(optimizer)`` and ``scaler.update()`` afterwards (and
        ``scaler.unscale_(optimizer)`` before clipping).
    autocast : dict, optional
        Keyword arguments of ``torch.autocast`` (e.g. ``{"device_type": "cpu",
        "dtype": torch.bfloat16}``) applied to both encoder passes and to the
        loss. An autocast region around :meth:`step` works as well.
    hard_negatives : bool, optional
        Whether the third of three inputs holds hard negatives (H documents
        per query, query-major: B*H rows): its embedding then goes to the loss
        as the keyword ``hard_negatives=``, reshaped to (B, H, d), after the
        first two positionally. Default: True when ``loss_fn`` (a module's
        ``forward``) has a parameter named ``hard_negatives``, as
        ``InfoNCE`` and ``GlobalInfoNCE`` do; otherwise every embedding is
        passed positionally, as it comes.
    batchnorm : {"warn", "eval", "error"}, default "warn"
        BatchNorm in training mode (or without running statistics) normalises
        each chunk by its own statistics, so the gradient is not the full-batch
        one. ``"warn"`` warns once per layer and
        goes on (running statistics are updated once per chunk, not twice);
        ``"eval"`` runs BatchNorm layers on their running statistics during
        the cached step (exact; the statistics are not updated; convert to
        ``nn.GroupNorm``/``nn.LayerNorm`` for a per-sample normalisation that
        trains; layers built with ``track_running_stats=False`` are refused);
        ``"error"`` raises.

    Notes
    -----
    Random layers (dropout) are exact: the second forward of each chunk
    replays the CPU generator and the CUDA generator of every device that the
    chunk's tensors, the encoder's parameters and buffers, and the current
    CUDA device live on. Under DDP, the representations of all ranks meet in
    the loss (``gather=True``), gradients are accumulated under ``no_sync`` and
    synchronised on the last backward of each DDP module; the result equals
    the single-process gradient of the global batch.

    Examples
    --------
    >>> import torch
    >>> from torch import nn
    >>> from negbatch import GradCache, InfoNCE
    >>> encoder = nn.Sequential(nn.Linear(8, 16), nn.Dropout(0.1), nn.Linear(16, 4))
    >>> cache = GradCache(encoder, InfoNCE(temperature=0.5), chunk_size=16)
    >>> optimizer = torch.optim.SGD(encoder.parameters(), lr=0.1)
    >>> view1, view2 = torch.randn(100, 8), torch.randn(100, 8)
    >>> loss = cache.step(view1, view2)   # steps 1-3: .grad is the full-batch gradient
    >>> optimizer.step(); optimizer.zero_grad()   # step 4
    >>> loss.shape
    torch.Size([])
    """

    def __init__(
        self,
        encoders: nn.Module | Sequence[nn.Module],
        loss_fn: Callable[..., Tensor],
        chunk_size: int | Sequence[int],
        *,
        output_fn: Callable[[Any], Tensor] | None = None,
        keep_last_graph: bool = False,
        paired: bool = True,
        scaler: Any = None,
        autocast: Mapping[str, Any] | None = None,
        hard_negatives: bool | None = None,
        batchnorm: BatchNormPolicy = "warn",
    ) -> None:
        """Set up the cache; see Parameters in ``help(GradCache)``."""
        if isinstance(encoders, nn.Module):
            self.encoders: list[nn.Module] | None = None
            self.shared = encoders
        elif isinstance(encoders, Sequence) and encoders and all(isinstance(e, nn.Module) for e in encoders):
            self.encoders, self.shared = list(encoders), None
        else:
            raise TypeError("encoders must be an nn.Module or a non-empty sequence of nn.Module (one per input)")
        if not callable(loss_fn):
            raise TypeError(f"loss_fn must be callable, got {type(loss_fn).__name__}")
        sizes = [chunk_size] if isinstance(chunk_size, str) or not isinstance(chunk_size, Sequence) else list(chunk_size)
        if not sizes:
            raise ValueError("chunk_size must be an int or a non-empty sequence of ints")
        for size in sizes:
            if not is_int(size):
                raise TypeError(f"chunk_size must be an int >= 1 (or one per input), got {size!r}")
            if size < 1:
                raise ValueError(f"chunk_size must be >= 1, got {size}")
        sizes = [int(size) for size in sizes]
        if self.encoders is not None and len(sizes) > 1 and len(sizes) != len(self.encoders):
            raise ValueError(
                f"give one chunk_size per encoder ({len(self.encoders)}), or a single int; got {len(sizes)}"
            )
        if batchnorm not in ("warn", "eval", "error"):
            raise ValueError(f"batchnorm must be 'warn', 'eval' or 'error', got {batchnorm!r}")
        if autocast is not None and not isinstance(autocast, Mapping):
            raise TypeError("autocast must be a dict of torch.autocast arguments, e.g. {'device_type': 'cuda'}")
        if scaler is not None and not hasattr(scaler, "scale"):
            raise TypeError("scaler must be a torch.amp.GradScaler (an object with .scale(loss))")
        takes_hard = _accepts_keyword(loss_fn, "hard_negatives")
        if hard_negatives not in (None, True, False):
            raise TypeError(f"hard_negatives must be True, False or None (from the loss), got {hard_negatives!r}")
        if hard_negatives and not takes_hard:
            raise ValueError(
                "hard_negatives=True passes the third embedding as loss_fn(..., hard_negatives=...), but loss_fn "
                "takes no such keyword; add the parameter or pass hard_negatives=False"
            )
        self.loss_fn = loss_fn
        self.hard_negatives = takes_hard if hard_negatives is None else hard_negatives
        self.chunk_sizes = sizes
        self.output_fn = output_fn
        self.keep_last_graph = check_flag(keep_last_graph, "keep_last_graph")
        self.paired = check_flag(paired, "paired")
        self.scaler = scaler
        self.autocast = dict(autocast) if autocast is not None else None
        self.batchnorm = batchnorm

    # ------------------------------------------------------------------ public

    def step(
        self, *inputs: EncoderInput, return_embeddings: bool = False, sync: bool = True, **loss_kwargs: Any
    ) -> Tensor | tuple[Tensor, tuple[Tensor, ...]]:
        """Steps 1-3: leave every encoder parameter's ``.grad`` incremented by
        the gradient of the full-batch loss, and return the loss.

        Parameters
        ----------
        *inputs : tensor, dict of tensors, or list/tuple of tensors or dicts
            One per loss argument, in the loss's order; input i goes through
            encoder i (or the shared encoder).
        return_embeddings : bool, default False
            Also return the detached embeddings, one tensor per input.
        sync : bool, default True
            Under DDP, synchronise gradients at the end of this step. Pass
            False on all but the last step of a gradient accumulation.
        **loss_kwargs
            Passed to ``loss_fn`` unchanged (``mask=``, ``generator=``,
            ``hard_negatives=``, ...).

        Returns
        -------
        loss : Tensor
            The detached, unscaled value of the loss on the whole batch.
        embeddings : tuple of Tensor
            Only with ``return_embeddings=True``.
        """
        cached = self.forward_no_grad(*inputs, sync=sync)
        loss = self.representation_gradients(cached, **loss_kwargs)
        self.backward_chunks(cached, sync=sync)
        if return_embeddings:
            return loss, tuple(cached.representations)
        return loss

    def forward_no_grad(self, *inputs: EncoderInput, sync: bool = True) -> CachedBatch:
        """Step 1: encode every chunk without a graph, recording the random
        state before each chunk (only the kept last chunk gets a graph)."""
        if not torch.is_grad_enabled():
            raise RuntimeError(
                "GradCache needs autograd, but it is disabled here (torch.no_grad() or torch.inference_mode()); "
                "call step() outside such a region"
            )
        encoders = self._encoders_for(len(inputs))
        sizes = self._check_inputs(inputs)
        chunks = [_split(x, self._chunk_size(i)) for i, x in enumerate(inputs)]
        self._check_batchnorm(encoders, chunks)
        last = (len(inputs) - 1, len(chunks[-1]) - 1)
        sync_items = self._sync_items(encoders, chunks, sync)
        one_row = any(_batch_length(c, "chunk") == 1 for parts in chunks for c in parts)
        before = self._batchnorm_snapshot(encoders) if one_row else []
        try:
            reps, rng, kept = self._first_pass(encoders, chunks, sizes, sync_items, last)
        except (ValueError, RuntimeError) as err:
            if one_row and "Expected more than 1 value per channel" in str(err):
                # A BatchNorm the pre-check cannot see (BatchNorm2d after global pooling): the chunks
                # before this one updated its running statistics; they are put back.
                self._batchnorm_restore(before)
                raise ValueError(
                    f"a chunk of 1 row reached a BatchNorm layer that needs more than one value per channel "
                    f"(training mode, or no running statistics); pick a chunk_size that leaves 2 or more rows in "
                    f"the last chunk (chunk sizes {self.chunk_sizes}), or pass batchnorm='eval'. The running "
                    f"statistics are as before this step"
                ) from err
            raise
        snapshot = self._batchnorm_snapshot(encoders)
        return CachedBatch(chunks=chunks, representations=reps, rng=rng, kept=kept, bn_snapshot=snapshot,
                           carries_graph=any(_carries_graph(x) for x in inputs), autocast=_ambient_autocast(),
                           versions=self._versions(encoders, inputs))

    def _first_pass(self, encoders, chunks, sizes, sync_items, last):
        """Every chunk encoded without a graph (the kept last one with it), each
        chunk's random state recorded: (representations, states, kept output)."""
        reps: list[Tensor] = []
        rng: list[list[_RngState | None]] = []
        kept = None
        with self._batchnorm_mode(encoders):
            for i, (encoder, parts) in enumerate(zip(encoders, chunks)):
                outs, states = [], []
                if not (self.keep_last_graph and (i, len(parts) - 1) == last and len(parts) == 1):
                    _warn_unreplayed_devices(encoder, parts[0])  # once a step, for chunks that are replayed
                for j, chunk in enumerate(parts):
                    if self.keep_last_graph and (i, j) == last:
                        with self._ddp_context(encoder, (i, j) in sync_items):
                            kept = self._encode(encoder, chunk, f"input {i}")
                        outs.append(kept.detach())
                        states.append(None)
                        continue
                    states.append(_RngState.capture(_cuda_devices(encoder, chunk)))
                    with torch.no_grad():
                        outs.append(self._encode(encoder, chunk, f"input {i}"))
                rep = torch.cat(outs) if len(outs) > 1 else outs[0]
                if rep.shape[0] != sizes[i]:
                    raise ValueError(
                        f"encoder output for input {i} has {rep.shape[0]} rows for a batch of {sizes[i]}; "
                        f"the encoder must return one embedding per row"
                    )
                reps.append(rep)
                rng.append(states)
        return reps, rng, kept

    def representation_gradients(self, cached: CachedBatch, **loss_kwargs: Any) -> Tensor:
        """Step 2: the loss on all representations, back-propagated to the
        representations only; their gradients are cached in ``cached``."""
        if cached.gradients or cached.backward_done:
            raise RuntimeError(
                "representation_gradients(cached) already ran for this batch: a second call would run the loss "
                "again (a stateful loss, GlobalInfoNCE or a queue, would update twice) and add its gradient twice; "
                "encode the next batch with forward_no_grad(...)"
            )
        leaves = [r.detach().requires_grad_(True) for r in cached.representations]
        args, hard = self._loss_args(leaves)
        with self._autocast():
            loss = self.loss_fn(*args, **hard, **loss_kwargs)
        if not isinstance(loss, Tensor):
            raise TypeError(f"loss_fn must return a tensor, got {type(loss).__name__}")
        if loss.dim() != 0:
            raise ValueError(
                f"loss_fn must return a scalar (0-d) tensor, got shape {tuple(loss.shape)}; "
                f"reduce it (e.g. reduction='mean')"
            )
        if not loss.requires_grad:
            raise ValueError(
                "the loss does not depend on the embeddings (no gradient): loss_fn must compute it "
                "from its arguments with differentiable operations"
            )
        scaled = self.scaler.scale(loss) if self.scaler is not None else loss
        # A full backward, not autograd.grad(loss, leaves): a loss's own trainable
        # tensors (a learnable temperature) get their gradient here, once.
        scaled.backward()
        encoders = self._encoders_for(len(leaves))
        for i, leaf in enumerate(leaves):
            if leaf.grad is None and _trainable(encoders[i]):
                raise ValueError(f"the loss does not depend on input {i}'s embeddings (no gradient reaches them)")
        cached.gradients = [leaf.grad for leaf in leaves]
        return loss.detach()

    def backward_chunks(self, cached: CachedBatch, sync: bool = True) -> None:
        """Step 3: re-encode each chunk with a graph under its replayed random
        state and back-propagate the cached representation gradients."""
        if not cached.gradients:
            if cached.backward_done:
                raise RuntimeError(
                    "backward_chunks(cached) already ran for this batch: its gradient is in .grad, and a second "
                    "call would add it again; encode the next batch with forward_no_grad(...)"
                )
            raise RuntimeError("call representation_gradients(cached) before backward_chunks(cached)")
        self._check_versions(cached)
        encoders = self._encoders_for(len(cached.chunks))
        sync_items = self._sync_items(encoders, cached.chunks, sync)
        if cached.kept is not None:
            # The kept graph goes first: with DDP its module must not see it
            # between another chunk's synchronised forward and backward.
            i, j = len(cached.chunks) - 1, len(cached.chunks[-1]) - 1
            if cached.kept.requires_grad and cached.gradients[i] is not None:
                with self._ddp_context(encoders[i], (i, j) in sync_items):
                    torch.autograd.backward(
                        cached.kept, self._chunk_grad(cached, i, j), retain_graph=cached.carries_graph
                    )
            cached.kept = None
        # The second pass must compute what the first did: in a trainer, the backward that
        # runs it is outside the autocast region the first pass ran in.
        with self._batchnorm_mode(encoders), _reentered(cached.autocast):
            for i, (encoder, parts) in enumerate(zip(encoders, cached.chunks)):
                if cached.gradients[i] is None or not self._may_need_backward(encoder, parts):
                    continue  # e.g. a frozen encoder on plain inputs: nothing to back-propagate into
                for j, chunk in enumerate(parts):
                    state = cached.rng[i][j]
                    if state is None:  # the kept chunk, done above
                        continue
                    grad = self._chunk_grad(cached, i, j)
                    with self._ddp_context(encoder, (i, j) in sync_items):
                        with state.replay():
                            out = self._encode(encoder, chunk, f"input {i}")
                        if out.shape != grad.shape:
                            raise RuntimeError(
                                f"input {i}, chunk {j}: the second forward gave shape {tuple(out.shape)}, "
                                f"the first {tuple(grad.shape)}; the encoder must be deterministic given its RNG"
                            )
                        if not out.requires_grad:
                            break  # no trainable tensor behind this input (the same for all its chunks)
                        torch.autograd.backward(out, grad, retain_graph=cached.carries_graph)
        self._batchnorm_restore(cached.bn_snapshot)
        cached.gradients, cached.backward_done = [], True

    # ----------------------------------------------------------------- helpers

    def _versions(self, encoders: list[nn.Module], inputs: Sequence[EncoderInput]) -> list[tuple[str, Tensor, int]]:
        """Every trainable parameter (of the encoders and a module output_fn) and
        every input tensor, with its in-place version counter now."""
        modules = [*encoders, *([self.output_fn] if isinstance(self.output_fn, nn.Module) else [])]
        seen: set[int] = set()
        found = []
        for module in modules:
            for name, p in module.named_parameters():
                if p.requires_grad and id(p) not in seen:
                    seen.add(id(p))
                    found.append((f"parameter {name!r}", p, p._version))
        for i, x in enumerate(inputs):
            # Inference tensors keep no version (and cannot reach a backward anyway).
            found += [(f"{key} (an input)", t, t._version) for key, t in _leaves(x, f"input {i}") if not t.is_inference()]
        return found

    @staticmethod
    def _check_versions(cached: CachedBatch) -> None:
        # The second pass must encode what the first did: re-encoding with other weights
        # or other data back-propagates the cached gradients through the wrong Jacobian.
        changed = [name for name, t, version in cached.versions if t._version != version]
        if changed:
            raise RuntimeError(
                f"{changed[0]} was modified in place after forward_no_grad(...)"
                f"{f' (and {len(changed) - 1} more)' if len(changed) > 1 else ''}: backward_chunks(cached) would "
                f"re-encode the batch with other weights or data, and the gradient would not be the batch's. Take "
                f"the optimizer step after backward_chunks, and do not refill the input tensors before it"
            )

    def _encoders_for(self, n_inputs: int) -> list[nn.Module]:
        if n_inputs == 0:
            raise ValueError("give at least one input to encode")
        if self.encoders is None:
            return [self.shared] * n_inputs
        if len(self.encoders) != n_inputs:
            raise ValueError(f"got {n_inputs} inputs for {len(self.encoders)} encoders; give one input per encoder")
        return self.encoders

    def _chunk_size(self, i: int) -> int:
        return self.chunk_sizes[0] if len(self.chunk_sizes) == 1 else self.chunk_sizes[i]

    def _check_inputs(self, inputs: Sequence[EncoderInput]) -> list[int]:
        if self.encoders is None and len(self.chunk_sizes) > 1 and len(self.chunk_sizes) != len(inputs):
            raise ValueError(f"give one chunk_size per input ({len(inputs)}), or a single int")
        sizes = [_batch_length(x, f"input {i}") for i, x in enumerate(inputs)]
        if any(s == 0 for s in sizes):
            raise ValueError(f"every input needs at least one row, got batch lengths {sizes}")
        if self.paired and len(sizes) >= 2 and sizes[0] != sizes[1]:
            raise ValueError(
                f"inputs 0 and 1 have batch lengths {sizes[0]} and {sizes[1]}, but the loss pairs them row by "
                f"row; give equal batches (or paired=False for a loss that does not pair them)"
            )
        if self._reshapes_hard_negatives(len(inputs)) and sizes[2] % sizes[0]:
            raise ValueError(
                f"input 2 (hard negatives) has {sizes[2]} rows, not a multiple of the {sizes[0]} queries; "
                f"give H hard negatives per query, query-major"
            )
        return sizes

    def _reshapes_hard_negatives(self, n_inputs: int) -> bool:
        return self.hard_negatives and n_inputs == 3

    def _loss_args(self, reps: list[Tensor]) -> tuple[list[Tensor], dict[str, Tensor]]:
        """Positional embeddings and, when the third input holds hard
        negatives, ``hard_negatives=`` shaped (B, H, d) (a keyword: GlobalInfoNCE
        takes ``indices`` third)."""
        if self._reshapes_hard_negatives(len(reps)):
            q, docs, hard = reps
            return [q, docs], {"hard_negatives": hard.reshape(q.shape[0], -1, hard.shape[-1])}
        return reps, {}

    def _may_need_backward(self, encoder: nn.Module, parts: list[EncoderInput]) -> bool:
        """False when no gradient can flow from this input's embeddings: a
        frozen encoder, inputs that do not require grad, no trainable output_fn."""
        if _trainable(encoder) or any(t.requires_grad for chunk in parts for t in _tensors(chunk)):
            return True
        if self.output_fn is None:
            return False
        if isinstance(self.output_fn, nn.Module):
            return _trainable(self.output_fn)
        return True  # a plain function may hold trainable tensors: the second pass finds out

    def _encode(self, encoder: nn.Module, chunk: EncoderInput, name: str) -> Tensor:
        with self._autocast():
            out = _call(encoder, chunk)
            if self.output_fn is not None:
                out = self.output_fn(out)
        if not isinstance(out, Tensor):
            raise TypeError(
                f"the encoder of {name} returned {type(out).__name__}, not a tensor; pass output_fn= to pick "
                f"the embedding out of it"
            )
        if out.dim() == 0:
            raise ValueError(
                f"the encoder of {name} returned a 0-d tensor; it must return one embedding per row "
                f"(a (chunk, d) tensor), not a reduced value"
            )
        return out

    def _autocast(self):
        return torch.autocast(**self.autocast) if self.autocast is not None else contextlib.nullcontext()

    @staticmethod
    def _chunk_grad(cached: CachedBatch, i: int, j: int) -> Tensor:
        # The batch's own chunk size (the full first chunk's rows), not this cache's: a batch
        # encoded by another GradCache is cut where its first pass cut it.
        size = _batch_length(cached.chunks[i][0], f"input {i}")
        return cached.gradients[i][j * size : (j + 1) * size]

    # DDP: accumulate under no_sync, synchronise on the last backward of each module.

    def _sync_items(
        self, encoders: list[nn.Module], chunks: list[list[EncoderInput]], sync: bool
    ) -> set[tuple[int, int]]:
        """The chunk whose backward synchronises each DDP module: its last
        backward in step 3's order (the kept chunk first, then input by input,
        chunk by chunk)."""
        if not sync:
            return set()
        kept = (len(chunks) - 1, len(chunks[-1]) - 1) if self.keep_last_graph else None
        last: dict[int, tuple[int, int]] = {}
        if kept is not None and isinstance(encoders[kept[0]], DistributedDataParallel):
            last[id(encoders[kept[0]])] = kept
        for i, encoder in enumerate(encoders):
            if not isinstance(encoder, DistributedDataParallel):
                continue
            for j in range(len(chunks[i])):
                if (i, j) != kept:
                    last[id(encoder)] = (i, j)
        return set(last.values())

    @staticmethod
    def _ddp_context(encoder: nn.Module, synchronise: bool):
        if isinstance(encoder, DistributedDataParallel) and not synchronise:
            return encoder.no_sync()
        return contextlib.nullcontext()

    # BatchNorm: per-chunk statistics are not the batch's.

    @staticmethod
    def _batchnorms(encoders: list[nn.Module], training_only: bool = True) -> list[nn.modules.batchnorm._BatchNorm]:
        seen, found = set(), []
        for encoder in encoders:
            for m in encoder.modules():
                if (
                    isinstance(m, nn.modules.batchnorm._BatchNorm)
                    and (m.training or not training_only)
                    and id(m) not in seen
                ):
                    seen.add(id(m))
                    found.append(m)
        return found

    def _check_batchnorm(self, encoders: list[nn.Module], chunks: list[list[EncoderInput]]) -> None:
        """Warn (or raise) about BatchNorm layers that will normalise each chunk by
        its own statistics: layers in training mode (unless batchnorm='eval'),
        and layers without running statistics, which do so in eval mode too."""
        layers = self._batchnorms(encoders, training_only=False)
        untracked = [m for m in layers if m.running_mean is None]
        if self.batchnorm == "eval":
            if untracked:
                raise ValueError(
                    f"batchnorm='eval' cannot make {type(untracked[0]).__name__} layers without running statistics "
                    f"(track_running_stats=False) exact: they normalise each chunk by its own statistics even in "
                    f"eval mode. Replace them by GroupNorm/LayerNorm, or pass batchnorm='warn' to accept that"
                )
            return
        per_chunk = [m for m in layers if m.training or m.running_mean is None]
        if not per_chunk:
            return
        self._check_one_row_chunks(encoders, chunks)
        message = (
            "GradCache: an encoder has BatchNorm that normalises by batch statistics (training mode, or no "
            "running statistics); each chunk is normalised by its own statistics, so the gradient is not the "
            "full-batch gradient. Use batchnorm='eval' (running statistics, exact) or replace BatchNorm by "
            "GroupNorm/LayerNorm; see docs/gradcache.md"
        )
        if self.batchnorm == "error":
            raise ValueError(message)
        if any(m not in _WARNED_BATCHNORM for m in per_chunk):
            warnings.warn(message, UserWarning, stacklevel=_stacklevel_outside_this_module())
            _WARNED_BATCHNORM.update(per_chunk)

    def _check_one_row_chunks(self, encoders: list[nn.Module], chunks: list[list[EncoderInput]]) -> None:
        """Refuse, before anything is encoded (a failure mid-pass would leave
        running statistics half updated), a 1-row chunk that reaches a
        BatchNorm1d in training mode: on (N, C) rows torch needs N >= 2.
        BatchNorm2d/3d normalise over the spatial positions too, so one image
        passes; only the encoder of the input whose chunk has 1 row counts."""
        for i, (encoder, parts) in enumerate(zip(encoders, chunks)):
            if not any(isinstance(m, nn.BatchNorm1d) and m.training for m in encoder.modules()):
                continue
            lengths = [_batch_length(c, "chunk") for c in parts]
            if 1 in lengths:
                raise ValueError(
                    f"a chunk of 1 row of input {i} reaches BatchNorm1d in training mode, which needs at least "
                    f"2 rows; pick a chunk_size that leaves 2 or more rows in the last chunk (chunk size "
                    f"{self._chunk_size(i)}, chunk lengths {sorted(set(lengths))}), or pass batchnorm='eval'"
                )

    @contextlib.contextmanager
    def _batchnorm_mode(self, encoders: list[nn.Module]):
        layers = self._batchnorms(encoders) if self.batchnorm == "eval" else []
        for m in layers:
            m.train(False)
        try:
            yield
        finally:
            for m in layers:
                m.train(True)

    def _batchnorm_snapshot(self, encoders: list[nn.Module]) -> list[tuple[Tensor, Tensor]]:
        # The second forward would update the running statistics a second time.
        if self.batchnorm == "eval":
            return []
        return [
            (buf, buf.detach().clone())
            for m in self._batchnorms(encoders)
            for buf in (m.running_mean, m.running_var, m.num_batches_tracked)
            if buf is not None
        ]

    @staticmethod
    def _batchnorm_restore(snapshot: list[tuple[Tensor, Tensor]]) -> None:
        with torch.no_grad():
            for buf, saved in snapshot:
                buf.copy_(saved)
