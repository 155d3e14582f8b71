"""Argument types and validation shared by the losses: fail early, name the argument."""

from __future__ import annotations

import difflib
import functools
import inspect
import math
from numbers import Integral, Real
from typing import Callable, Literal, TypeVar, Union

import torch
from torch import Tensor

#: Negatives per anchor: every candidate, or K sampled (see negbatch.negatives).
Negatives = Union[Literal["all"], int]
#: An anchor with fewer than K valid candidates: raise, or use all it has.
OnShortage = Literal["raise", "use_all"]
#: Two views of each sample (SimCLR), or queries with their documents (dual encoder).
Form = Literal["two_view", "query_document"]
Reduction = Literal["mean", "sum", "none"]

_Init = TypeVar("_Init", bound=Callable[..., None])


def refuse_second_order(ctx: object) -> None:
    """First line of the backward of negbatch's fused autograd functions.

    Their backward computes the gradient from saved buffers, not from a graph;
    a backward with ``create_graph=True`` (a gradient penalty, a
    Hessian-vector product) would get a second order that silently misses
    their part. Grad mode is on in a backward only under ``create_graph``.
    """
    if torch.is_grad_enabled():
        name = type(ctx).__name__.removesuffix("Backward")
        raise RuntimeError(
            f"negbatch's fused loss kernel {name} gives first-order gradients only; a backward with "
            f"create_graph=True (a gradient penalty, a Hessian-vector product) is not supported through it. "
            f"The small-batch path (autograd's cross-entropy), sampled negatives read off a dense product (K "
            f"above a tenth of the candidates) and bfloat16/float16 inputs do support it"
        )


def is_int(value: object) -> bool:
    """Whether ``value`` is an integer: a Python int or one of numpy's
    (``np.int64``, read off an array or a schedule, is no int), never a bool.

    A float of whole value (``3.0``, ``np.float64(3)``) is not one. A caller
    keeps ``int(value)``, so that repr, state dicts and JSON hold plain
    Python numbers.
    """
    return isinstance(value, Integral) and not isinstance(value, bool)


def is_real(value: object) -> bool:
    """Whether ``value`` is a real number: a Python int or float or one of
    numpy's (``np.float32`` is no float), never a bool.

    NaN and inf are real numbers here: a caller checks finiteness where it
    matters, and keeps ``float(value)``.
    """
    return isinstance(value, Real) and not isinstance(value, bool)


def check_positive_int(value: object, name: str) -> int:
    """``value`` as a Python int if it is an integer >= 1 (see :func:`is_int`),
    else a ValueError that names it."""
    if not is_int(value) or value < 1:
        raise ValueError(f"{name} must be a positive int, got {value!r}")
    return int(value)


def check_seed(value: object, name: str = "seed") -> int:
    """``value`` as a Python int if it is a seed every generator takes: an
    integer (see :func:`is_int`) in ``[0, 2**64)``; else an error that names it."""
    if not is_int(value):
        raise TypeError(f"{name} must be an int, got {type(value).__name__}")
    if value < 0:
        raise ValueError(f"{name} must be >= 0 (numpy's seed sequences take no negative numbers), got {value}")
    if value >= 2**64:
        raise ValueError(f"{name} must be below 2**64 (torch.Generator's range, as torch.initial_seed()), got {value}")
    return int(value)


def check_temperature(temperature: float, name: str = "temperature") -> float:
    if not is_real(temperature):
        raise TypeError(f"{name} must be a positive float, got {type(temperature).__name__}")
    if not math.isfinite(temperature) or temperature <= 0:
        raise ValueError(f"{name} must be a finite float > 0, got {temperature}")
    return float(temperature)


def check_embeddings(x: Tensor, name: str, *, dim: int = 2, check_finite: bool = True) -> Tensor:
    if not isinstance(x, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if x.dim() != dim:
        raise ValueError(f"{name} must be {dim}-d, got shape {tuple(x.shape)}")
    if not x.is_floating_point():
        raise TypeError(f"{name} must be a floating-point tensor, got dtype {x.dtype}")
    if check_finite and not all_finite(x):
        raise ValueError(
            f"{name} contains NaN or inf; check the encoder's output (learning rate too high, "
            f"fp16 overflow) before the loss"
        )
    return x


def all_finite(x: Tensor) -> bool:
    """Whether ``x`` holds no NaN or inf.

    One sum first (NaN and inf make it non-finite): a single cheap pass in
    the common case; only a non-finite sum, which an overflow of huge finite
    values can also give, is settled element by element.
    """
    wide = torch.float32 if x.dtype in (torch.float16, torch.bfloat16) else None
    if bool(torch.isfinite(x.detach().sum(dtype=wide))):
        return True
    return bool(torch.isfinite(x).all())


def check_nonempty(x: Tensor, name: str) -> None:
    if x.shape[0] == 0:
        raise ValueError(
            f"{name} is an empty batch (0 rows); a contrastive loss needs at least one anchor "
            f"(with gather=True, every rank needs at least one row)"
        )


def check_same(a: Tensor, b: Tensor, name_a: str, name_b: str, *, dims: tuple[int, ...]) -> None:
    for d in dims:
        if a.shape[d] != b.shape[d]:
            raise ValueError(
                f"{name_a} and {name_b} must agree in dimension {d}, got shapes "
                f"{tuple(a.shape)} and {tuple(b.shape)}"
            )
    if a.device != b.device:
        raise ValueError(f"{name_a} is on {a.device} but {name_b} is on {b.device}; move both to one device")
    if a.dtype != b.dtype:
        raise TypeError(f"{name_a} has dtype {a.dtype} but {name_b} has {b.dtype}; cast one of them")


def check_mask(mask: Tensor | None, shape: tuple[int, int], device: torch.device, name: str = "mask") -> Tensor | None:
    if mask is None:
        return None
    if not isinstance(mask, Tensor):
        raise TypeError(f"{name} must be a bool tensor, got {type(mask).__name__}")
    if mask.dtype != torch.bool:
        raise TypeError(f"{name} must have dtype torch.bool (True = known false negative), got {mask.dtype}")
    if tuple(mask.shape) != tuple(shape):
        raise ValueError(f"{name} must have shape {tuple(shape)}, got {tuple(mask.shape)}")
    if mask.device != device:
        raise ValueError(f"{name} is on {mask.device} but the embeddings are on {device}")
    return mask


def check_choice(value: object, name: str, choices: tuple[str, ...]) -> str:
    if value not in choices:
        options = ", ".join(repr(c) for c in choices[:-1]) + f" or {choices[-1]!r}"
        raise ValueError(f"{name} must be {options}, got {value!r}")
    return value  # type: ignore[return-value]


def check_flag(value: object, name: str) -> bool:
    """A True/False option (a string such as 'no' would otherwise count as True)."""
    if not isinstance(value, bool):
        raise TypeError(f"{name} must be True or False, got {value!r}")
    return value


def check_loss_options(*, form: str, symmetric: bool, on_shortage: str, reduction: str) -> None:
    """The options every loss of negbatch shares."""
    check_choice(form, "form", ("two_view", "query_document"))
    check_flag(symmetric, "symmetric")
    if symmetric and form != "query_document":
        raise ValueError("symmetric=True applies to form='query_document' only (two_view is already symmetric)")
    check_choice(on_shortage, "on_shortage", ("raise", "use_all"))
    check_choice(reduction, "reduction", ("mean", "sum", "none"))


def keyword_only(example: str, positional: int = 0) -> Callable[[_Init], _Init]:
    """Decorate a constructor whose arguments after the first ``positional``
    are keyword-only, so that a positional call is told what to write.

    ``InfoNCE(16)`` reads as 16 negatives to one user and as temperature 16 to
    another; Python's own refusal ("takes 1 positional argument but 2 were
    given") does not say what to write instead. The decorated ``__init__``
    keeps its signature and docstring for ``help()``.
    """

    def decorate(init: _Init) -> _Init:
        parameters = inspect.signature(init).parameters.values()
        accepted = [p.name for p in parameters if p.name != "self" and p.kind is not p.VAR_KEYWORD]
        open_ended = any(p.kind is p.VAR_KEYWORD for p in parameters)  # **kwargs: nothing is unknown

        @functools.wraps(init)
        def checked(self, *args, **kwargs):
            unknown = [k for k in kwargs if k not in accepted]
            if unknown and not open_ended:
                # Python's own refusal names the key only; an option of another loss (SigLIP has no
                # queue_size) or a typo is answered with what this loss takes.
                close = difflib.get_close_matches(unknown[0], accepted, n=1)
                hint = f" (did you mean {close[0]!r}?)" if close else ""
                raise TypeError(f"{type(self).__name__}() has no argument {unknown[0]!r}{hint}; it takes "
                                f"{', '.join(accepted)}")
            if len(args) > positional:
                given = ", ".join(repr(a) for a in args[positional:])
                which = "its arguments" if positional == 0 else f"the arguments after the first {positional}"
                raise TypeError(
                    f"{type(self).__name__}() takes {which} by keyword only, got {given} by position; "
                    f"name each one, e.g. {example} (a bare number could be the temperature or the "
                    f"number of negatives)"
                )
            init(self, *args, **kwargs)

        return checked  # type: ignore[return-value]

    return decorate


#: Why a batch can hold one sample, and what to do (the losses whose
#: denominator needs a negative: DCL, GlobalInfoNCE).
BATCH_OF_ONE_HINT = (
    "An epoch's last batch holds one sample when N mod the batch size is 1: drop it (DataLoader(drop_last=True); "
    "sentence-transformers: dataloader_drop_last=True) or pick a batch size that leaves no single sample"
)
