"""The ``negbatch`` command: demo, study, train, report.

Run ``negbatch COMMAND --help`` for each command's options. A study runs on
the modality of its data set (``--data``/``--dataset``: images by default;
``bible``, ``builtin`` and ``pairs:PATH`` are text pairs), which decides the
options it takes: ``negbatch study NAME --data bible --help`` lists the text
version's.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import difflib
import json
import os
import sys
import time
from pathlib import Path

__all__ = ["main", "build_parser", "DEMO"]

# The demo: the negatives study on scikit-learn's digits, sized to finish in
# a few minutes on a 2-core laptop CPU (docs/lab.md gives measured times).
DEMO = {
    "dataset": "digits",
    "encoder": "mlp",
    "encoder_widths": "256,128",
    "head_widths": "256,64",
    "batch_size": 128,
    "epochs": 15,
    "lrs": "0.002",  # the negatives study sweeps the learning rate: one value
    "aug_strength": 0.5,
    "losses": "simclr,relic",
    "ks": "1,2,5,10,50,100,all",
    "seeds": "0,1,2",
    "temperatures": "0.2",
}

_EXAMPLE_DATA = {"image": "digits", "text": "bible"}


class _Parser(argparse.ArgumentParser):
    """An ArgumentParser whose unknown options are reported by the (sub)command
    they were given to, with its usage and the closest option it has.

    Prefixes of options are not accepted: with options as close as --lr and
    --lr-scaling, or --batch-size and --batch-sizes, argparse's abbreviations
    turned one into the other (an option a command lacks became another one)."""

    def __init__(self, *args, **kwargs) -> None:
        kwargs.setdefault("allow_abbrev", False)
        super().__init__(*args, **kwargs)

    def unknown(self, extras: list[str]) -> None:
        options = [s[2:] for a in self._actions for s in a.option_strings if s.startswith("--")]
        hints = []
        for arg in extras:
            if arg.startswith("--"):
                name = arg.split("=", 1)[0]
                # One letter off a two-letter name (--kz for --ks) is half of it: a lower bar for short names.
                close = difflib.get_close_matches(name[2:], options, n=1, cutoff=0.5 if len(name) <= 4 else 0.6)
                if close:
                    hints.append(f"{name}: did you mean --{close[0]}?")
        self.error(f"unrecognized arguments: {' '.join(extras)}" + (f" ({'; '.join(hints)})" if hints else ""))

    def error(self, message: str):
        """argparse's refusal, its line naming the rank as the command's other errors do (:func:`_who`)."""
        self.print_usage(sys.stderr)
        self.exit(2, f"{_who(self.prog)}: error: {message}\n")


def folder_argument(text: str) -> str:
    """An ``--out`` value: a folder's path (an empty one would put the run's
    files loose in the current folder)."""
    if not text.strip():
        raise argparse.ArgumentTypeError("must name a folder, got an empty string")
    return text


def _version() -> str:
    from . import __version__

    return __version__


def build_parser(study: tuple[str, str] | None = None) -> _Parser:
    """The command's parser. ``study = (name, modality)`` gives that study the
    options of that modality (each study otherwise shows its default modality's)."""
    from .lab.config import add_config_arguments
    from .lab.studies import get_study, modalities, study_names

    parser = _Parser(prog="negbatch", description="How should batches and negatives be formed in contrastive learning?")
    parser.add_argument("--version", action="version", version=f"negbatch {_version()}")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", required=True, parser_class=_Parser)
    parser.leaves = {}

    demo = commands.add_parser("demo", help="the negatives study on the digits data set (a few minutes on a laptop CPU)",
                               description="Run the negatives study on scikit-learn's digits and print where its report is.")
    demo.add_argument("--out", default="negbatch-runs/demo", type=folder_argument,
                      help="study folder (default: negbatch-runs/demo)")
    demo.add_argument("--workers", type=int, default=2, help="worker processes (default: 2)")
    demo.add_argument("--seeds", default=DEMO["seeds"], help=f"comma list of seeds (default: {DEMO['seeds']})")
    demo.add_argument("--epochs", type=int, default=DEMO["epochs"], help=f"epochs per run (default: {DEMO['epochs']})")
    parser.leaves["demo"] = demo

    names = study_names()
    study_cmd = commands.add_parser(
        "study", help="run a study: " + ", ".join(names),
        description="Run a study; rerunning it skips finished runs. A study runs on images (the default data set) or, "
                    "with --data bible|builtin|pairs:PATH, on text pairs, with the options of that version: "
                    "`negbatch study NAME --data bible --help` lists them.")
    studies = study_cmd.add_subparsers(dest="study", metavar="STUDY", required=True, parser_class=_Parser)
    parser.leaves["study"] = study_cmd
    for name in names:
        have = modalities(name)
        modality = study[1] if study is not None and study[0] == name else have[0]
        obj = get_study(name, modality)
        others = [m for m in have if m != modality]
        epilog = (f"These are the options of the {name} study on {modality} data. "
                  + (" ".join(f"On {m} data: negbatch study {name} --data {_EXAMPLE_DATA[m]} --help." for m in others)
                     if others else f"The {name} study runs on {modality} data only."))
        p = studies.add_parser(name, help=obj.summary, description=obj.description, epilog=epilog,
                               formatter_class=argparse.RawDescriptionHelpFormatter)
        obj.add_arguments(p)
        if p.epilog != epilog:  # the study's own note first
            p.epilog = f"{p.epilog}\n\n{epilog}"
        p.set_defaults(study_obj=obj)
        parser.leaves[f"study {name}"] = p

    train = commands.add_parser(
        "train", help="train one configuration (images or text pairs)",
        usage="%(prog)s [-h] [--config FILE] [--out FOLDER] [--OPTION VALUE ...]  (the options: negbatch train --help)",
        description="Train one configuration on images or text pairs (the data set decides: --data bible, builtin or "
                    "pairs:PATH train a dual encoder on text pairs, with --query-column/--document-column/"
                    "--hard-negatives-column naming the columns of your file; --encoder minilm trains the pre-trained "
                    "all-MiniLM-L6-v2 through sentence-transformers' SentenceTransformerTrainer, --train-layers N "
                    "only its top N layers; --unsupervised true: SimCSE-style, each query its own positive). "
                    "Options mirror the keys of a "
                    "TOML/YAML/JSON --config file (command-line options win); options of the other modality must "
                    "stay unset.")
    train.add_argument("--config", default=None, help="TOML, YAML or JSON file of training options (a run's config.json works)")
    train.add_argument("--out", default="negbatch-runs/train", type=folder_argument,
                       help="run folder (default: negbatch-runs/train); an unfinished run there resumes")
    add_config_arguments(train)
    parser.leaves["train"] = train

    report = commands.add_parser("report", help="(re)write the report of a study or run folder",
                                 description="Write report.md and figures for a study folder or a finished training run.")
    report.add_argument("folder", help="study or run folder")
    parser.leaves["report"] = report
    return parser


def _leaf(parser: _Parser, args: argparse.Namespace) -> _Parser:
    command = getattr(args, "command", None)
    if command == "study" and getattr(args, "study", None):
        return parser.leaves[f"study {args.study}"]
    return parser.leaves.get(command, parser)


def _demo(args: argparse.Namespace) -> Path:
    from .lab.studies import get_study

    study = get_study("negatives", "image")
    parser = _Parser()  # no abbreviations: each option of DEMO must be the study's own
    study.add_arguments(parser)
    argv = []
    for key, value in {**DEMO, "seeds": args.seeds, "epochs": args.epochs}.items():
        argv += [f"--{key.replace('_', '-')}", str(value)]
    argv += ["--out", args.out, "--workers", str(args.workers)]
    return study.run(parser.parse_args(argv))


def _note_study_table(config: str | None) -> None:
    """A recipe's [study] table is a study's: say that train reads only its training options
    (a user trained one run with a recipe and believed its seeds and sweeps applied)."""
    from .lab.config import load_study_options

    study = load_study_options(config) if config else {}
    if study and int(os.environ.get("RANK", "0")) == 0:
        name = study.get("name", "<name>")
        print(f"negbatch train: {config} has a [study] table ({', '.join(sorted(study))}), which train does not read: "
              f"it trains one run of the file's training options; for the study, negbatch study {name} --config "
              f"{config}", file=sys.stderr)


def _train(args: argparse.Namespace) -> None:
    from .lab import load_config_file, train
    from .lab.config import config_from_args, set_in_file
    from .lab.studies import report_folder

    base = load_config_file(args.config) if args.config else {}
    _note_study_table(args.config)
    if not hasattr(args, "progress") and "progress" not in base and sys.stderr.isatty():
        base["progress"] = True  # a progress bar when someone is watching
    cfg = config_from_args(args, base)
    in_file = set_in_file(base)  # a run's config.json records every field: those at their defaults are not set
    given = [f.name for f in dataclasses.fields(cfg) if hasattr(args, f.name) or f.name in in_file]
    unused = cfg.inapplicable(given)
    if unused:
        raise ValueError("options that this run would not use (drop them, or choose what they apply to): "
                         + "; ".join(unused))
    summary = train(cfg, args.out)
    if summary is None:  # stopped by Ctrl-C or SIGTERM at a checkpoint (train() said where)
        raise KeyboardInterrupt(f"the run in {args.out} is checkpointed")
    if int(os.environ.get("RANK", "0")) != 0:
        return  # under torchrun every process trained; rank 0 reports
    report = report_folder(args.out)
    if cfg.task == "text":
        from .lab.tasks.text import TEXT_METRICS, starting_model

        trained = ", ".join(f"{k} {summary[k]:.4f}" for k in TEXT_METRICS)
        untrained = ", ".join(f"{k} {summary['untrained_' + k]:.4f}" for k in ("recall@1", "ndcg@10"))
        print(f"test retrieval ({summary['num_test_queries']} queries, {summary['num_test_documents']} documents): "
              f"{trained} ({starting_model(cfg.encoder)}: {untrained}); report: {report}")
    elif "linear_acc" not in summary:  # images without labels (a .npy): trained, nothing to probe
        print(f"trained {summary['steps']} steps; evaluation: {summary.get('evaluation')}; report: {report}")
    else:
        print(f"linear accuracy {summary['linear_acc']:.4f}, kNN accuracy {summary['knn_acc']:.4f}; report: {report}")


def _refuse_config_where_none_is_read(argv: list[str]) -> None:
    """A study without --config said 'config file X does not exist' for a missing
    file and 'unrecognized arguments' for an existing one: say what is so."""
    from .lab.studies import get_study, option_value

    selected = _selected_study(argv)
    if selected and not get_study(*selected).takes_config and option_value(argv, ("--config",)) is not None:
        raise ValueError(f"the {selected[0]} study on {selected[1]} data has no --config: its options are its own "
                         f"(negbatch study {selected[0]} --help)")


def _selected_study(argv: list[str]) -> tuple[str, str] | None:
    """``(name, modality)`` of a ``study NAME ...`` command line (the modality from its data set)."""
    from .lab.studies import get_study, modality_of_argv, study_names

    if len(argv) < 2 or argv[0] != "study" or argv[1] not in study_names():
        return None
    selected = (argv[1], modality_of_argv(argv[2:]))
    get_study(*selected)  # a ValueError when the study has no version for that data
    return selected


def _study_options(name: str) -> dict[str, argparse.Action]:
    """Every option string of study ``name`` on either modality, with its
    argparse action (empty for an unknown study)."""
    from .lab.studies import STUDIES, get_study

    found: dict[str, argparse.Action] = {}
    for study_name, modality in STUDIES:
        if study_name != name:
            continue
        parser = _Parser()
        get_study(name, modality).add_arguments(parser)
        for action in parser._actions:
            for option in action.option_strings:
                found.setdefault(option, action)
    return found


def with_recipe(argv: list[str]) -> list[str]:
    """``study NAME --config FILE ...`` with the options of FILE's ``[study]`` table
    (a recipe) inserted after ``NAME``, so that the command line's own win."""
    from .lab.config import load_study_options
    from .lab.studies import option_value

    config = option_value(argv, ("--config",)) if len(argv) > 1 and argv[0] == "study" else None
    if config is None:
        return argv
    options = dict(load_study_options(config))
    name = options.pop("name", argv[1])
    if name != argv[1]:
        raise ValueError(f"{config} is a recipe of the {name} study; run: negbatch study {name} --config {config}")
    known = _study_options(argv[1])
    extra: list[str] = []
    for key, value in options.items():
        flag = "--" + str(key).replace("_", "-")
        if known and flag not in known:
            close = difflib.get_close_matches(flag, sorted(known), n=1)
            hint = f" (did you mean {close[0][2:].replace('-', '_')!r}?)" if close else ""
            raise ValueError(f"{config}: [study] key {key!r} is not an option of the {argv[1]} study{hint}")
        extra += _recipe_option(config, key, value, flag, known.get(flag))
    return argv[:2] + extra + argv[2:]


def _recipe_option(config: str, key: str, value: object, flag: str, action: argparse.Action | None) -> list[str]:
    """The command-line words of one ``[study]`` entry, checked here so that a
    wrong value is reported against the file, not as a command-line option
    the user never typed."""
    if action is not None and action.nargs == 0:  # a switch: true gives it, false leaves it out
        if not isinstance(value, bool):
            raise ValueError(f"{config}: [study] {key} = {value!r}: expected true or false")
        return [flag] if value else []
    if isinstance(value, bool):  # an option that reads "true"/"false" (--hflip) gets the word
        text = "true" if value else "false"
    else:
        text = ",".join(map(str, value)) if isinstance(value, list) else str(value)
    if action is not None:
        where = f"{config}: [study] {key} = {json.dumps(value)}"
        try:
            converted = action.type(text) if callable(action.type) else text
        except (ValueError, TypeError, argparse.ArgumentTypeError) as err:
            expected = {int: "expected an integer", float: "expected a number"}.get(action.type, str(err))
            raise ValueError(f"{where}: {expected}") from None
        if action.choices is not None and converted not in action.choices:
            raise ValueError(f"{where}: expected one of {', '.join(map(repr, action.choices))}")
    return [flag, text]


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        _refuse_config_where_none_is_read(argv)
        argv = with_recipe(argv)
        selected = _selected_study(argv)
    except ValueError as err:
        print(f"{_who('negbatch study')}: error: {err}", file=sys.stderr)
        return 2
    parser = build_parser(selected)
    args, extras = parser.parse_known_args(argv)
    if extras:
        _leaf(parser, args).unknown(extras)
    try:
        from .lab.folder import note_stop_signal
        from .lab.sweep import terminate_as_interrupt

        note_stop_signal(None)

        # SIGTERM stops a command as Ctrl-C does wherever it comes (set-up, measurements, between
        # runs); the training loops install their own handler (stop after the step) and restore it.
        with _process_group(args), terminate_as_interrupt():
            return _run(args)
    except FileNotFoundError as err:
        if _about_out(args, err):  # the system's: --out cannot be made (under /proc, say)
            return _cannot_write(args, err)
        print(f"{_speaker(args)}: error: {err}", file=sys.stderr)  # a data set, a file named in the options
        return 2
    except (ValueError, TypeError, ModuleNotFoundError) as err:  # the last: a missing extra
        print(f"{_speaker(args)}: error: {err}", file=sys.stderr)
        return 2
    except OSError as err:  # a folder that cannot be written: read-only, a file in its place, a full disk
        return _cannot_write(args, err)
    except KeyboardInterrupt as err:  # Ctrl-C, or a run stopped by SIGINT/SIGTERM (lab.sweep.RunStopped)
        # Finished runs and the results table are on disk; an interrupted run has its checkpoint.
        where = f" ({err})" if str(err) else ""
        status = _stopped_status()
        if os.environ.get("RANK", "0") != "0":
            # Under torchrun every process stops (Ctrl-C reaches them all, or the launcher stops them when
            # one fails): rank 0 says so, once; the other processes' lines repeated it (or stood beside
            # another process's error that they did not answer).
            return status
        print(f"negbatch {args.command}: stopped{where}; everything finished is kept: run the same command again "
              f"to resume", file=sys.stderr)
        return status


def _speaker(args: argparse.Namespace) -> str:
    """Who says an error: under torchrun every process checks the same options and prints the same error,
    so the processes other than rank 0 name their rank (a rank's own error, a missing file on one node,
    stays visible)."""
    return _who(f"negbatch {args.command}")


def _who(command: str) -> str:
    """``command`` as it signs an error: with its rank in a process other than rank 0 (see :func:`_speaker`)."""
    rank = os.environ.get("RANK", "0")
    return command + (f" (rank {rank})" if rank != "0" else "")


def _stopped_status() -> int:
    """Exit status of a stopped command: 128 + the signal that stopped it (130 for Ctrl-C, 143 for SIGTERM), as
    a shell reports a process the signal ended, so that a scheduler can tell a preempted job from a failed one."""
    import signal

    from .lab.folder import stop_signal

    return 128 + (stop_signal() or signal.SIGINT)


def _about_out(args: argparse.Namespace, err: OSError) -> bool:
    """Whether the system's error ``err`` is about ``--out`` (the folder, inside it or above it)."""
    out = getattr(args, "out", None)
    if err.errno is None or not out or not err.filename:
        return False
    where, folder = Path(os.fsdecode(err.filename)).absolute(), Path(out).absolute()
    return where == folder or folder in where.parents or where in folder.parents


def _cannot_write(args: argparse.Namespace, err: OSError) -> int:
    where = f" {os.fsdecode(err.filename)}" if err.filename else ""
    option = "--out" if _about_out(args, err) else "--out, or the report's folder"
    print(f"{_speaker(args)}: error: cannot write{where}: {err.strerror or err}; give a writable folder "
          f"({option})", file=sys.stderr)
    return 2


@contextlib.contextmanager
def _process_group(args: argparse.Namespace):
    """Under torchrun, a study's processes join one process group for all its runs
    (``negbatch train`` joins it in :func:`negbatch.lab.train`)."""
    from .lab.processes import Processes, launched_by_torchrun

    if args.command not in ("study", "demo") or not launched_by_torchrun():
        yield
        return
    procs = Processes.start(getattr(args, "device", "cpu"))
    try:
        with procs.warnings_on_main():
            yield
    finally:
        procs.close()


def _run(args: argparse.Namespace) -> int:
    from .lab.processes import Processes

    main_rank = Processes.current().is_main
    if args.command == "demo":
        start = time.perf_counter()
        folder = _demo(args)
        if main_rank:
            print(f"demo finished in {time.perf_counter() - start:.0f} s; report: {folder / 'report.md'}")
    elif args.command == "study":
        folder = args.study_obj.run(args)
        if main_rank:
            print(f"report: {folder / 'report.md'}")
    elif args.command == "train":
        _train(args)
    elif args.command == "report":
        from .lab.studies import report_folder

        print(f"report: {report_folder(args.folder)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
