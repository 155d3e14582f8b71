"""What every study shares: :class:`Study`, and its image and text bases.

A study is one subclass per (study, modality) -- ``negatives`` on images,
``negatives`` on text pairs, ... -- registered in
:data:`negbatch.lab.studies.STUDIES`. The base gives each one:

* its options: ``--out``, ``--seeds``, ``--workers``, ``--config`` and every
  training option of its modality that it does not set itself (``swept``),
  with the study's own defaults (``defaults``) over the task's;
* the base configuration: defaults < ``--config`` file < command line;
* the study folder and its ``study.json`` (written atomically);
* the runs, through :func:`negbatch.lab.sweep.run_configs`, with one progress
  line per run trained now (with an estimate of the time left) and one line
  for the runs finished earlier;
* a progress bar per run when stderr is a terminal (and one worker).

A subclass writes :meth:`Study.plan` (the configurations and ``study.json``),
:meth:`Study.line` (a run's progress line), optionally
:meth:`Study.after_training` (measurements on the trained runs), and
:meth:`Study.report` (figures and ``report.md`` from the folder alone); or
:meth:`Study.run` as a whole.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import sys
import time
from pathlib import Path
from typing import Any, ClassVar

from ...cli import folder_argument
from ..config import (
    FOLDER_DATASETS, IMAGE_ONLY, IMAGE_ONLY_SET, TEXT_ONLY, TrainConfig, add_config_arguments, load_config_file,
    set_in_file, without_replaced_length,
)
from ..processes import Processes, main_process
from ..folder import CONFIG, STUDY, SUMMARY, atomic_write_text, hold_lock
from ..sweep import (KEY_FIELDS, adopt_earlier_runs, check_workers, keep_results, parse_list, run_configs, run_key,
                     torch_threads)

__all__ = ["Study", "ImageStudy", "TextStudy", "say", "keep_plan_results", "dataset_stem"]

#: What to say of an unread option in every study (a study's own unread_hints come first).
_UNREAD_HINTS = {"data_dir": f"give --dataset (one of {', '.join(FOLDER_DATASETS)} reads it)"}


def say(message: str) -> None:
    """One line of progress on stderr, by rank 0 alone under torchrun (whose processes all run the study)."""
    if main_process():
        print(message, file=sys.stderr, flush=True)


def keep_plan_results(folder: Path, keys: set[str], what: str = "run(s)") -> None:
    """Keep in ``folder``'s results table only the runs of this invocation's plan (``keys``), so
    that it and ``study.json`` describe one invocation; say how many finished ``what`` left it."""
    left = keep_results(folder, keys)
    if left:
        say(f"note: {left} finished {what} in {folder / 'runs'} belong to an earlier invocation with other "
            "options: they stay there but leave the results table and the report (rerun that command to "
            "bring them back, or use another --out)")


def _duration(seconds: float) -> str:
    """``"40 s"``, ``"12 min"``, ``"2.5 h"``: an estimate's precision."""
    if seconds < 90:
        return f"{seconds:.0f} s"
    if seconds < 5400:
        return f"{seconds / 60:.0f} min"
    return f"{seconds / 3600:.1f} h"


def dataset_stem(dataset: str) -> str:
    """A folder-name-safe name of a data set: ``pairs:/x/my.jsonl`` -> ``pairs-my``."""
    if ":" in dataset:
        kind, path = dataset.split(":", 1)
        return f"{kind}-{Path(path.strip()).stem}"
    return dataset


class Study:
    """One study on one modality (images or text pairs).

    Class attributes
    ----------------
    name : str
        The study's name (``negbatch study NAME``).
    modality : str
        ``"image"`` or ``"text"``: the task of the data sets it runs on.
    summary : str
        One line for ``negbatch study --help``.
    swept : tuple of str
        Training options the study sets per run: not options of the study.
    defaults : dict
        The study's defaults over the task's (:data:`negbatch.lab.config.TASK_DEFAULTS`).
    key_fields : tuple of str
        The fields that name each run's folder (before a hash of the configuration).
    parallel_by_default : bool
        ``--workers`` defaults to the machine's cores (else to 1: comparable times).
    """

    name: ClassVar[str] = ""
    modality: ClassVar[str] = "image"
    summary: ClassVar[str] = ""
    swept: ClassVar[tuple[str, ...]] = ()
    defaults: ClassVar[dict[str, Any]] = {}
    key_fields: ClassVar[tuple[str, ...]] = KEY_FIELDS
    default_seeds: ClassVar[str] = "0,1,2"
    parallel_by_default: ClassVar[bool] = False
    #: Whether the study reads a --config file (the image gradcache study has only its own options).
    takes_config: ClassVar[bool] = True

    @property
    def description(self) -> str:
        """The study module's docstring (``negbatch study NAME --help``), its
        reST markup (``:mod:`~x.y```, double backquotes) shown as plain text."""
        doc = sys.modules[type(self).__module__].__doc__ or self.summary
        doc = re.sub(r":\w+:`~?([^`]+)`", r"\1", doc)
        return doc.replace("``", "")

    # ---------------------------------------------------------------- options

    def add_arguments(self, parser: argparse.ArgumentParser) -> None:
        """The study's options: its own (:meth:`add_study_arguments`), then the
        training options of its modality it does not sweep."""
        g = parser.add_argument_group("study options")
        g.add_argument("--out", default=None, type=folder_argument,
                       help=f"study folder (default: negbatch-runs/{self.name}-DATASET)")
        self.add_study_arguments(g)
        g.add_argument("--seeds", default=self.default_seeds, help=f"comma list of seeds (default: {self.default_seeds})")
        if self.parallel_by_default:
            g.add_argument("--workers", type=int, default=None,
                           help="worker processes (default: the machine's cores; 1 under torchrun)")
        else:
            g.add_argument("--workers", type=int, default=1, help="worker processes (default: 1)")
        g.add_argument("--config", default=None,
                       help="TOML/YAML/JSON file of training options (those the study sets are overridden)")
        foreign = TEXT_ONLY if self.modality == "image" else IMAGE_ONLY + tuple(IMAGE_ONLY_SET)
        add_config_arguments(parser, exclude=self.swept + foreign)
        shown = {k: v for k, v in self.defaults.items() if k not in self.swept}
        for action in parser._actions:
            if action.dest in shown and action.help:
                # The training option's own default would mislead here: state the study's.
                own = re.sub(r"\s*\(default[^)]*\)", "", action.help).rstrip("; ")
                action.help = f"{own} (this study's default: {shown[action.dest]})"
        if shown:
            parser.epilog = ("Study defaults over the training options' own: "
                             + ", ".join(f"--{k.replace('_', '-')} {v}" for k, v in shown.items()) + ".")

    def add_study_arguments(self, group: argparse._ArgumentGroup) -> None:
        """Options of this study (beside ``--out``, ``--seeds``, ``--workers``, ``--config``)."""

    def study_defaults(self, dataset: str) -> dict[str, Any]:
        """The study's defaults for ``dataset`` (by default :attr:`defaults`)."""
        return dict(self.defaults)

    # ------------------------------------------------------------ configuration

    def base_config(self, args: argparse.Namespace, **fixed: Any) -> TrainConfig:
        """The configuration every run starts from: the study's defaults < the
        ``--config`` file < the command line < ``fixed``."""
        from_file = load_config_file(args.config) if getattr(args, "config", None) else {}
        from_file = {str(k).replace("-", "_"): v for k, v in from_file.items()}
        # The training options given on the command line (they default to argparse.SUPPRESS: present
        # only when given); a swept field's name may be a study option of another meaning.
        command_line = {k: getattr(args, k) for k in TrainConfig.__dataclass_fields__
                        if hasattr(args, k) and k not in self.swept}
        given = {**without_replaced_length(from_file, command_line), **command_line}
        # What write_spec checks the plan's runs read: a file's keys at their defaults are not set
        # (a run's config.json, a valid --config, records every field).
        in_file = set_in_file(from_file)
        self._given = [k for k in given if k in command_line or k in in_file]
        # The study's own default data set when none is given (not TrainConfig's): its defaults depend on it.
        values = self.study_defaults(str(given.get("dataset", self.defaults.get("dataset", TrainConfig.dataset))))
        if "epochs" in given or "steps" in given:  # one given: the study's default of the other goes
            values.pop("epochs", None)
            values.pop("steps", None)
        if "progress" not in given and getattr(args, "workers", 1) == 1 and sys.stderr.isatty():
            values["progress"] = True  # a bar per run when someone is watching
        values.update(given)
        values.update(fixed)
        cfg = TrainConfig.from_dict(self.adjust(values))
        self._check_fixed(given, cfg)
        if cfg.task != self.modality:
            raise ValueError(f"the {self.name} study on {self.modality} data got dataset={cfg.dataset!r}, "
                             f"a {cfg.task} data set")
        return cfg

    #: Training options the study's measurement depends on: ``{option: (the values it allows, why)}``.
    #: Given otherwise (command line or --config), the runs would train something else than the
    #: report describes: refused.
    fixed_options: ClassVar[dict[str, tuple[tuple[Any, ...], str]]] = {}

    def _check_fixed(self, given: dict[str, Any], cfg: TrainConfig) -> None:
        wrong = [f"{name}={getattr(cfg, name)!r}: {why}" for name, (allowed, why) in self.fixed_options.items()
                 if name in given and getattr(cfg, name) not in allowed]
        if wrong:
            raise ValueError(f"the {self.name} study does not take " + "; ".join(wrong)
                             + " (negbatch train runs any of them)")

    def adjust(self, values: dict[str, Any]) -> dict[str, Any]:
        """Last changes to the merged options before they are validated."""
        return values

    def seeds(self, args: argparse.Namespace) -> list[int]:
        seeds = parse_list(args.seeds, int, "seeds", unique=True)
        negative = [s for s in seeds if s < 0]
        if negative:
            raise ValueError(f"--seeds: {negative[0]} is negative; seeds are ints >= 0 (e.g. --seeds 0,1,2)")
        return seeds

    def check_workers(self, args: argparse.Namespace) -> None:
        procs = Processes.current()
        if args.workers is None:  # a parallel study's default: every core this process may use
            cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
            args.workers = 1 if procs.several else cores  # under torchrun the processes train each run together
        check_workers(args.workers, "--workers")  # before the plan writes study.json (run_configs checks again)

    # ------------------------------------------------------------ folder, runs

    def out_folder(self, args: argparse.Namespace, dataset: str) -> Path:
        return Path(args.out or f"negbatch-runs/{self.name}-{dataset_stem(dataset)}")

    def write_spec(self, out: Path, spec: dict[str, Any], configs: list[TrainConfig] | None = None) -> None:
        """``study.json``: the study's name, modality and settings (what its report reads).

        Takes the study folder's lock first and holds it until :meth:`release_folder`
        (the end of :meth:`run`): a second study on a folder in use is refused before
        it writes anything (it rewrote the running study's settings). A folder of
        another study, or ``configs`` (the plan's runs) holding one run twice, are
        refused before anything is written; the results table then keeps only the
        plan's finished runs, so that it and ``study.json`` always describe one
        invocation (also when this one is stopped before its first run ends)."""
        unread = self.unread_options(configs or [])
        if unread:
            raise ValueError("; ".join(unread) + ". No run of this study would read it: leave it unset (each run's "
                             "config.json would record it as used)")
        for device in sorted({c.device for c in configs or []}):
            Processes.current().device(device)  # a device that is not there: refused before study.json and runs/
        for cfg in configs or []:  # under torchrun, a batch the processes cannot share: refused before any run trains
            try:
                Processes.current().check_shares(cfg)
            except ValueError as err:
                raise ValueError(f"a run of this study: {err}") from None
        if not Processes.current().is_main:
            return
        if self._folder_locks is None:
            self._folder_locks = contextlib.ExitStack()
        self._folder_locks.enter_context(hold_lock(out, reentrant=True))
        self._check_folder_holds_this_study(out)
        keys = [run_key(c, self.key_fields) for c in configs] if configs is not None else None
        if keys is not None and len(set(keys)) != len(keys):
            raise ValueError("two configurations of the study are identical (a value given twice?); remove the "
                             "duplicates")
        out.mkdir(parents=True, exist_ok=True)
        planned = {"planned_runs": len(configs)} if configs is not None else {}  # a partial report counts against it
        atomic_write_text(out / "study.json",
                          json.dumps({"study": self.name, "modality": self.modality, **spec, **planned}, indent=1))
        if keys is not None:
            adopt_earlier_runs(out, configs, self.key_fields)  # run folders named before 2026-12-03
            keep_plan_results(out, set(keys))

    _given: list[str] = []
    #: Why an option the user gave is read by no run of the plan, where the study can say more than "none has one".
    unread_hints: ClassVar[dict[str, str]] = {}

    def unread_options(self, configs: list[TrainConfig]) -> list[str]:
        """Of the training options given (:meth:`base_config`), those no run of ``configs`` reads, each with why:
        an option of a loss, sampler or optimizer that none of the runs has."""
        out = []
        for name in self._given:
            reasons = [c.inapplicable([name]) for c in configs]
            if configs and all(reasons):
                hint = self.unread_hints.get(name, _UNREAD_HINTS.get(name, "no run of this study has one"))
                out.append(f"{reasons[0][0].split(' (')[0]}; {hint}")
        return out

    def _check_folder_holds_this_study(self, out: Path) -> None:
        path = out / STUDY
        if not path.exists():
            if (out / CONFIG).exists():
                raise ValueError(f"{out} holds a run of `negbatch train` (its config.json), not a study: the study's "
                                 "report would replace the run's; use another --out")
            return
        try:
            old = json.loads(path.read_text())
        except ValueError:
            return  # a damaged file: rewritten below
        if isinstance(old, dict) and "study" in old and (old["study"], old.get("modality")) != (self.name, self.modality):
            raise ValueError(
                f"{out} holds a {old.get('study')} study ({old.get('modality')} data), not a {self.name} study on "
                f"{self.modality} data; use another --out"
            )

    def train(self, configs: list[TrainConfig], out: Path, workers: int, what: str = "runs") -> list[dict[str, Any]]:
        """Train ``configs`` into ``out/runs`` (skipping finished runs), printing
        ``[i/n] self.line(summary)`` for each run trained now."""
        keys = {run_key(c, self.key_fields) for c in configs}
        earlier = {k for k in keys if (out / "runs" / k / SUMMARY).exists()}
        todo = len(configs) - len(earlier)
        if Processes.current().is_main:
            say(f"{self.name} study ({self.modality}): {len(configs)} {what} into {out}"
                + (f"; {len(earlier)} finished earlier (skipped)" if earlier else ""))
        count, started = [0], time.monotonic()

        def on_done(summary: dict[str, Any], done: int, total: int) -> None:
            if summary["run"] in earlier:
                return
            count[0] += 1
            left = (time.monotonic() - started) / count[0] * (todo - count[0])
            eta = f" (about {_duration(left)} left)" if count[0] < todo else ""
            say(f"[{count[0]}/{todo}] {self.line(summary)}{eta}")

        return run_configs(configs, out, workers=workers, key_fields=self.key_fields, on_done=on_done)

    # ----------------------------------------------------------- the study

    def run(self, args: argparse.Namespace) -> Path:
        """Run the study (skipping what a previous run of it finished); returns its folder.

        :meth:`plan`, :meth:`train`, :meth:`after_training`, :meth:`report`."""
        self.check_workers(args)
        try:
            out, configs = self.plan(args)
            self.train(configs, out, args.workers)
            if Processes.current().is_main:  # under torchrun every process trains, rank 0 writes
                self.after_training(args, out)
                self.report(out)
        finally:
            self.release_folder()
        return out

    _folder_locks: contextlib.ExitStack | None = None

    def release_folder(self) -> None:
        """Release the study folder's lock taken by :meth:`write_spec`."""
        if self._folder_locks is not None:
            self._folder_locks.close()
            self._folder_locks = None

    def plan(self, args: argparse.Namespace) -> tuple[Path, list[TrainConfig]]:
        """Check the options, write ``study.json``; the study folder and the runs' configurations."""
        raise NotImplementedError

    def line(self, summary: dict[str, Any]) -> str:
        """What the progress line of a finished run says (after ``[i/n]``)."""
        raise NotImplementedError

    def after_training(self, args: argparse.Namespace, out: Path) -> None:
        """Work on the trained runs before the report (nothing by default)."""

    def report(self, folder: Path) -> Path:
        """Write ``report.md`` and its figures from the study folder alone; returns the report's path."""
        raise NotImplementedError


class ImageStudy(Study):
    """A study on image data: the raw-pixel baseline."""

    modality: ClassVar[str] = "image"

    @staticmethod
    def load(base: TrainConfig, batch_size: int | None = None):
        """The data of ``base`` (after ``n_train``/``n_test``) -- data errors before any folder is
        made -- checked against the batch size (``base.batch_size`` unless given)."""
        from ..tasks.image import load_image_data

        data = load_image_data(base).subset(base.n_train, base.n_test)
        batch_size = base.batch_size if batch_size is None else batch_size
        if batch_size > data.x_train.shape[0]:
            raise ValueError(f"--batch-size {batch_size} exceeds the {data.x_train.shape[0]} training images of "
                             f"{base.dataset!r}; lower it")
        return data

    @staticmethod
    def raw_pixel_baseline(base: TrainConfig, out: Path | None = None) -> float:
        """Linear-probe accuracy on the raw pixels: the bar a learned representation should clear.

        Read from ``out/study.json`` when a previous run of the study on the same
        configuration recorded it (a rerun recomputes nothing it finished)."""
        saved = out / "study.json" if out is not None else None
        if saved is not None and saved.exists():
            spec = json.loads(saved.read_text())
            try:
                same = TrainConfig.from_dict(spec.get("base", {})).identity() == base.identity()
            except ValueError:
                same = False
            if same and spec.get("raw_pixel_linear_acc") is not None:
                return spec["raw_pixel_linear_acc"]
        from ..tasks.image import load_image_data
        from ...evaluation import linear_probe

        data = load_image_data(base).subset(base.n_train, base.n_test)
        flat = lambda x: x.reshape(x.shape[0], -1)  # noqa: E731
        with torch_threads(1):  # as the runs' probes: not the machine's core count
            return linear_probe(flat(data.x_train), data.y_train, flat(data.x_test), data.y_test)


class TextStudy(Study):
    """A study on text pairs: defaults sized for a few minutes per run on a 2-core CPU
    (8,000 Bible pairs, 120 steps of batch 64), the data loaded and checked first."""

    modality: ClassVar[str] = "text"
    defaults: ClassVar[dict[str, Any]] = {"batch_size": 64, "steps": 120, "lr": 1e-3}

    def study_defaults(self, dataset: str) -> dict[str, Any]:
        values = dict(self.defaults)
        if dataset == "bible":
            values["max_pairs"] = 8000
        elif dataset == "builtin":
            values["test_fraction"] = 0.25  # 34 training / 6 test pairs of the 40
        return values

    def add_arguments(self, parser: argparse.ArgumentParser) -> None:
        super().add_arguments(parser)
        parser.epilog = ((parser.epilog or "") + " With --data bible: --max-pairs 8000 (0: all pairs); with --data "
                         "builtin: --test-fraction 0.25.")

    def adjust(self, values: dict[str, Any]) -> dict[str, Any]:
        if values.get("max_pairs") in (0, "0"):
            values["max_pairs"] = None  # 0: every pair
        return values

    def load(self, base: TrainConfig):
        """The (train, test) split of ``base`` -- data errors before any folder is made --
        checked against the batch size."""
        from ..tasks.text import load_text_split

        train, test = load_text_split(base)
        if base.batch_size > len(train):
            raise ValueError(f"--batch-size {base.batch_size} exceeds the {len(train)} training pairs of "
                             f"{base.dataset!r}; lower it")
        return train, test

    @staticmethod
    def before_training(base: dict[str, Any]) -> str:
        """What the ``untrained_*`` metrics measure: the scratch encoder at initialisation, or
        MiniLM as it was pre-trained (zero-shot), for a report's sentences."""
        from ..tasks.text import starting_model

        return starting_model(base.get("encoder"))

    @staticmethod
    def objective(base: dict[str, Any], swept: tuple[str, ...] = ()) -> str:
        """The runs' loss as their configuration sets it, for a report: ``"InfoNCE (query_document, all
        in-batch negatives, symmetric=True, temperature 0.05)"``. A text study takes ``--loss``,
        ``--negatives``, a queue, ... unless it sweeps or fixes them, so its report reads them here
        rather than assume InfoNCE. Options in ``swept`` are left out (the report gives their values)."""
        loss = base.get("loss") or "infonce"
        parts = ["query_document"]
        if "negatives" not in swept:
            k = base.get("negatives", "all")
            parts.append("all in-batch negatives" if k == "all" else f"{k} sampled negatives per query")
        if base.get("queue_size"):
            parts.append(f"a queue of {base['queue_size']}")
        if base.get("key_momentum"):
            parts.append(f"keys from a momentum encoder of momentum {base['key_momentum']}")
        parts.append(f"symmetric={base.get('symmetric')}")
        if "temperature" not in swept:
            learned = "learned from " if base.get("learnable_temperature") else ""
            parts.append(f"temperature {learned}{base.get('temperature')}")
        if loss == "global":
            parts.append(f"gamma {base.get('gamma')}" + (f" ({base['gamma_schedule']} schedule)"
                                                         if base.get("gamma_schedule") != "constant" else ""))
        name = {"infonce": "InfoNCE", "global": "GlobalInfoNCE", "dcl": "DCL", "siglip": "SigLIP"}.get(loss, loss)
        return f"{name} ({', '.join(parts)})"

    @staticmethod
    def optimizer(base: dict[str, Any]) -> str:
        """The runs' optimizer as their configuration sets it, for a report: ``"AdamW (weight decay 0.01)"``."""
        name = base.get("optimizer") or "adamw"
        settings = [f"momentum {base.get('momentum')}"] if name in ("sgd", "lars") else []
        settings.append(f"weight decay {base.get('weight_decay')}")
        if base.get("schedule") not in (None, "constant"):
            settings.append(f"{base['schedule']} schedule, {base.get('warmup_steps') or 0} warm-up steps")
        label = {"adamw": "AdamW", "adam": "Adam", "sgd": "SGD", "lars": "LARS"}.get(name, name)
        return f"{label} ({', '.join(settings)})"

    @staticmethod
    def describe(base: dict[str, Any], sample: dict[str, Any]) -> str:
        """The data and encoder of a text study, for its report."""
        pairs = "all pairs" if base["max_pairs"] is None else f"max_pairs {base['max_pairs']}"
        data = (f"Data `{base['dataset']}`: {sample.get('num_train_pairs')} training pairs; "
                f"{sample.get('num_test_queries')} test queries searched among {sample.get('num_test_documents')} "
                f"test documents ({pairs}, test fraction {base['test_fraction']}, split seed {base['data_seed']}).")
        if base.get("unsupervised"):
            data += (" Unsupervised (SimCSE-style): each training query is its own positive, dropout the only "
                     "augmentation; the documents are not trained on.")
        if base.get("encoder") == "minilm":
            layers = base.get("train_layers")
            return (data + " Encoder: the pre-trained all-MiniLM-L6-v2, trained through sentence-transformers' "
                    f"SentenceTransformerTrainer ({f'top {layers} of 6 layers' if layers else 'every layer'} "
                    f"trained), dropout {base['dropout']}, max length {base['max_length']}.")
        return (data + f" Encoder: transformer, dim {base['text_dim']}, {base['text_depth']} layer(s), "
                f"{base['text_heads']} heads, dropout {base['dropout']}, vocabulary {base['vocab_size']}, max length "
                f"{base['max_length']}.")
