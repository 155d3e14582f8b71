"""Training configuration: one dataclass, mirrored by the command line and by
TOML / YAML files.

Every field of :class:`TrainConfig` is a ``--field-name`` option of
``negbatch train`` and a ``field_name`` (or ``field-name``) key of a config
file. Unknown keys and bad values raise ``ValueError`` naming them.
"""

from __future__ import annotations

import argparse
import dataclasses
import difflib
import json
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

__all__ = ["TrainConfig", "load_config_file", "add_config_arguments", "config_from_args", "parse_negatives"]


RUNTIME_ONLY = ("progress", "checkpoint_every")


def parse_negatives(value: Any) -> str | int:
    """``"all"`` or a positive int (strings of digits accepted)."""
    if isinstance(value, str) and value.strip().isdigit():
        value = int(value)
    if value == "all" or (isinstance(value, int) and not isinstance(value, bool) and value >= 1):
        return value
    raise ValueError(f"negatives must be 'all' or a positive int, got {value!r}")


def _int_tuple(value: Any) -> tuple[int, ...]:
    if isinstance(value, str):
        value = [v for v in value.replace(",", " ").split()]
    try:
        out = tuple(int(v) for v in value)
    except (TypeError, ValueError):
        raise ValueError(f"expected a list of positive ints, got {value!r}") from None
    if not out or any(v < 1 for v in out):
        raise ValueError(f"expected a non-empty list of positive ints, got {value!r}")
    return out


@dataclass(frozen=True)
class TrainConfig:
    """One contrastive training run (see docs/lab.md for every field)."""

    # data
    dataset: str = field(default="digits", metadata={"help": "digits, fashion-mnist or mnist5k", "choices": ("digits", "fashion-mnist", "mnist5k")})
    data_dir: str | None = field(default=None, metadata={"help": "folder with the Fashion-MNIST IDX files"})
    n_train: int | None = field(default=None, metadata={"help": "use the first N training images (default all)"})
    n_test: int | None = field(default=None, metadata={"help": "use the first N test images (default all)"})
    aug_strength: float = field(default=0.5, metadata={"help": "augmentation strength in [0, 1]"})
    hflip: bool = field(default=False, metadata={"help": "random horizontal flips"})
    # model
    encoder: str = field(default="mlp", metadata={"help": "mlp or conv", "choices": ("mlp", "conv")})
    encoder_widths: tuple[int, ...] = field(default=(256, 128), metadata={"help": "MLP hidden widths or conv stage channels, e.g. 256,128"})
    head_widths: tuple[int, ...] = field(default=(256, 64), metadata={"help": "projection head widths, e.g. 2048,128"})
    # objective
    loss: str = field(default="simclr", metadata={"help": "simclr (InfoNCE), relic or global (GlobalInfoNCE, bias-corrected)", "choices": ("simclr", "relic", "global")})
    negatives: str | int = field(default="all", metadata={"help": "negatives per anchor: all or K"})
    temperature: float = field(default=0.2, metadata={"help": "softmax temperature"})
    alpha: float = field(default=1.0, metadata={"help": "ReLIC invariance weight"})
    gamma: float = field(default=0.9, metadata={"help": "global loss: E-step rate of the running normalisers (final rate of a schedule)"})
    gamma_schedule: str = field(default="constant", metadata={"help": "global loss: gamma constant, or decaying from 1 to gamma over training (linear, cosine)", "choices": ("constant", "linear", "cosine")})
    # optimisation
    batch_size: int = field(default=128, metadata={"help": "samples per batch (2x views)"})
    epochs: int = field(default=10, metadata={"help": "passes over the training set"})
    optimizer: str = field(default="adam", metadata={"help": "sgd, adam, adamw or lars", "choices": ("sgd", "adam", "adamw", "lars")})
    lr: float = field(default=1e-3, metadata={"help": "peak learning rate"})
    weight_decay: float = field(default=1e-6, metadata={"help": "weight decay"})
    momentum: float = field(default=0.9, metadata={"help": "momentum (sgd, lars)"})
    warmup_steps: int = field(default=0, metadata={"help": "linear warm-up steps before the cosine decay"})
    chunk_size: int | None = field(default=None, metadata={"help": "encode each view in chunks of N rows (None or 0: one pass); see chunk_method"})
    chunk_method: str = field(default="cache", metadata={"help": "with chunk_size: cache (GradCache, the full-batch loss) or accumulate (a loss per chunk: fewer negatives)", "choices": ("cache", "accumulate")})
    sampler: str = field(default="random", metadata={"help": "batch sampler: random, gcbs (global contrastive batch sampling) or hard (k-means hard-negative batches)", "choices": ("random", "gcbs", "hard")})
    gcbs_q: float = field(default=0.999, metadata={"help": "gcbs: quantile of the similarity matrix above which pairs become graph edges"})
    refresh_every: int = field(default=0, metadata={"help": "gcbs/hard: re-plan the remaining batches every N steps (0: once per epoch)"})
    log_gap: bool = field(default=False, metadata={"help": "log each epoch's global-train loss gap (one extra pass over the training set per epoch)"})
    # bookkeeping
    seed: int = field(default=0, metadata={"help": "seed of every random draw"})
    snr: bool = field(default=True, metadata={"help": "track the gradient signal-to-noise ratio"})
    snr_beta: float = field(default=0.95, metadata={"help": "EMA decay of the SNR tracker"})
    log_every: int = field(default=1, metadata={"help": "log metrics every N steps"})
    checkpoint_every: int = field(default=0, metadata={"help": "checkpoint every N steps (0: only at the end)"})
    knn_k: int = field(default=20, metadata={"help": "neighbours of the kNN probe"})
    device: str = field(default="cpu", metadata={"help": "cpu, cuda or auto"})
    progress: bool = field(default=False, metadata={"help": "show a tqdm progress bar"})

    def __post_init__(self) -> None:
        errors = []

        def bad(name: str, msg: str) -> None:
            errors.append(f"{name}: {msg} (got {getattr(self, name)!r})")

        for f in fields(self):
            choices = f.metadata.get("choices")
            if choices and getattr(self, f.name) not in choices:
                bad(f.name, f"expected one of {', '.join(choices)}")
        positive = ("batch_size", "epochs", "log_every", "knn_k")
        for name in positive:
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                bad(name, "expected a positive int")
        for name in ("n_train", "n_test"):
            v = getattr(self, name)
            if v is not None and (isinstance(v, bool) or not isinstance(v, int) or v < 1):
                bad(name, "expected a positive int or None")
        if self.chunk_size is not None and (isinstance(self.chunk_size, bool) or not isinstance(self.chunk_size, int) or self.chunk_size < 0):
            bad("chunk_size", "expected an int >= 0 or None (0 and None: no chunking)")
        for name in ("warmup_steps", "checkpoint_every", "seed", "refresh_every"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 0:
                bad(name, "expected an int >= 0")
        if not (isinstance(self.temperature, (int, float)) and self.temperature > 0):
            bad("temperature", "expected a float > 0")
        if not (isinstance(self.lr, (int, float)) and self.lr > 0):
            bad("lr", "expected a float > 0")
        for name in ("weight_decay", "alpha"):
            if not (isinstance(getattr(self, name), (int, float)) and getattr(self, name) >= 0):
                bad(name, "expected a float >= 0")
        if not (isinstance(self.gcbs_q, (int, float)) and 0 < self.gcbs_q < 1):
            bad("gcbs_q", "expected a float strictly between 0 and 1 (the paper uses 0.999)")
        if not (isinstance(self.gamma, (int, float)) and 0 < self.gamma <= 1):
            bad("gamma", "expected a float in (0, 1]")
        if not (isinstance(self.momentum, (int, float)) and 0 <= self.momentum < 1):
            bad("momentum", "expected a float in [0, 1)")
        if not (isinstance(self.snr_beta, (int, float)) and 0 < self.snr_beta < 1):
            bad("snr_beta", "expected a float in (0, 1)")
        if not (isinstance(self.aug_strength, (int, float)) and 0 <= self.aug_strength <= 1):
            bad("aug_strength", "expected a float in [0, 1]")
        try:
            parse_negatives(self.negatives)
        except ValueError:
            bad("negatives", "expected 'all' or a positive int")
        if self.device not in ("cpu", "cuda", "auto") and not str(self.device).startswith("cuda:"):
            bad("device", "expected cpu, cuda, cuda:N or auto")
        if errors:
            raise ValueError("invalid training configuration:\n  " + "\n  ".join(errors))
        if self.chunk_size == 0:  # one spelling of "no chunking", so that resuming and skipping agree
            object.__setattr__(self, "chunk_size", None)

    @classmethod
    def from_dict(cls, values: dict[str, Any], *, source: str = "config") -> "TrainConfig":
        """Build a config from a mapping (file contents, JSON); keys may use ``-`` or ``_``.

        Raises ``ValueError`` naming unknown keys (with the closest valid name) and
        values of the wrong type.

        Examples
        --------
        >>> from negbatch.lab import TrainConfig
        >>> TrainConfig.from_dict({"loss": "relic", "negatives": 10, "head-widths": [64, 32]}).head_widths
        (64, 32)
        """
        known = {f.name: f for f in fields(cls)}
        kwargs: dict[str, Any] = {}
        errors = []
        for key, value in values.items():
            name = str(key).replace("-", "_")
            if name not in known:
                close = difflib.get_close_matches(name, known, n=1)
                hint = f" (did you mean {close[0]!r}?)" if close else ""
                errors.append(f"unknown key {key!r} in {source}{hint}")
                continue
            try:
                kwargs[name] = _coerce(known[name], value)
            except ValueError as err:
                errors.append(f"{key}: {err}")
        if errors:
            # Also the value checks of the keys that did parse: every problem at once.
            try:
                cls(**kwargs)
            except ValueError as err:
                errors += [line.strip() for line in str(err).splitlines()[1:]]
            raise ValueError("invalid training configuration:\n  " + "\n  ".join(errors))
        return cls(**kwargs)

    def to_dict(self) -> dict[str, Any]:
        """A JSON-friendly dict (tuples become lists)."""
        return {k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(self).items()}

    def identity(self) -> dict[str, Any]:
        """The fields that decide a run's results (all but ``progress`` and
        ``checkpoint_every``): what resuming and skipping finished runs compare."""
        return {k: v for k, v in self.to_dict().items() if k not in RUNTIME_ONLY}

    def replace(self, **changes: Any) -> "TrainConfig":
        return self.from_dict({**self.to_dict(), **changes})


def _coerce(f: dataclasses.Field, value: Any) -> Any:
    """Convert a file or command-line value to the field's type, strictly."""
    default = f.default
    if f.name == "negatives":
        return parse_negatives(value)
    if f.name in ("encoder_widths", "head_widths"):
        return _int_tuple(value)
    if value is None or (isinstance(value, str) and value.lower() in ("none", "null") and default is None):
        if default is None:
            return None
        raise ValueError(f"expected a {type(default).__name__}, got None")
    if isinstance(default, bool):
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "false", "1", "0", "yes", "no"):
            return value.lower() in ("true", "1", "yes")
        raise ValueError(f"expected true or false, got {value!r}")
    if isinstance(default, int) or f.name in ("n_train", "n_test", "chunk_size"):
        if isinstance(value, bool):
            raise ValueError(f"expected an int, got {value!r}")
        if isinstance(value, int):
            return value
        if isinstance(value, str) and value.strip().lstrip("-").isdigit():
            return int(value)
        raise ValueError(f"expected an int, got {value!r}")
    if isinstance(default, float):
        if isinstance(value, bool):
            raise ValueError(f"expected a float, got {value!r}")
        try:
            return float(value)
        except (TypeError, ValueError):
            raise ValueError(f"expected a float, got {value!r}") from None
    if not isinstance(value, str):
        raise ValueError(f"expected a string, got {value!r}")
    return value


def load_config_file(path: str | Path) -> dict[str, Any]:
    """Read a TOML (``.toml``), YAML (``.yaml``/``.yml``) or JSON (``.json``, e.g. a
    run's ``config.json``) file into a dict.

    A ``[train]`` table / ``train:`` mapping is used if present, else the top level.
    """
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"config file {path} does not exist")
    text = path.read_text()
    if path.suffix == ".toml":
        try:
            import tomllib
        except ImportError:  # Python 3.10
            import tomli as tomllib

        try:
            data = tomllib.loads(text)
        except tomllib.TOMLDecodeError as err:
            raise ValueError(f"config file {path} is not valid TOML: {err}") from None
    elif path.suffix in (".yaml", ".yml"):
        try:
            import yaml
        except ImportError:
            raise ValueError("YAML config files need PyYAML: pip install pyyaml (or use a .toml file)") from None
        try:
            data = yaml.safe_load(text)
        except yaml.YAMLError as err:
            raise ValueError(f"config file {path} is not valid YAML: {err}") from None
    elif path.suffix == ".json":
        try:
            data = json.loads(text)
        except json.JSONDecodeError as err:
            raise ValueError(f"config file {path} is not valid JSON: {err}") from None
    else:
        raise ValueError(f"config file {path}: expected a .toml, .yaml, .yml or .json file")
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ValueError(f"config file {path} must hold a mapping of option names to values")
    if isinstance(data.get("train"), dict):
        others = sorted(k for k in data if k != "train")
        if others:
            raise ValueError(
                f"config file {path} has a [train] table / train: mapping and other top-level keys {others}; "
                f"put every training option under it, or drop it and give them all at the top level"
            )
        data = data["train"]
    return data


def add_config_arguments(parser: argparse.ArgumentParser, exclude: tuple[str, ...] = ()) -> None:
    """Add one ``--field-name`` option per :class:`TrainConfig` field.

    Options default to ``argparse.SUPPRESS`` so that only the ones given on the
    command line override a config file.
    """
    group = parser.add_argument_group("training options (also valid keys of a --config file)")
    for f in fields(TrainConfig):
        if f.name in exclude:
            continue
        default = f.default
        shown = ",".join(map(str, default)) if isinstance(default, tuple) else default
        group.add_argument(
            "--" + f.name.replace("_", "-"),
            dest=f.name,
            default=argparse.SUPPRESS,
            metavar=f.name.upper(),
            help=f"{f.metadata.get('help', '')} (default: {shown})",
        )


def config_from_args(args: argparse.Namespace, base: dict[str, Any] | None = None) -> TrainConfig:
    """Defaults < ``base`` (e.g. a file's contents) < options given on the command line."""
    values = dict(base or {})
    for f in fields(TrainConfig):
        if hasattr(args, f.name):
            values[f.name] = getattr(args, f.name)
    return TrainConfig.from_dict(values)
