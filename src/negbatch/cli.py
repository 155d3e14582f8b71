"""The ``negbatch`` command: demo, study, train, report.

Run ``negbatch COMMAND --help`` for each command's options.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

__all__ = ["main", "DEMO"]

# The demo: the negatives study on scikit-learn's digits, sized to finish in
# a few minutes on a 2-core laptop CPU (docs/lab.md gives measured times).
DEMO = {
    "dataset": "digits",
    "encoder": "mlp",
    "encoder_widths": "256,128",
    "head_widths": "256,64",
    "batch_size": 128,
    "epochs": 15,
    "lr": 2e-3,
    "aug_strength": 0.5,
    "losses": "simclr,relic",
    "ks": "1,2,5,10,50,100,all",
    "seeds": "0,1,2",
    "temperatures": "0.2",
}


def _study_parser(sub, name: str, module) -> None:
    p = sub.add_parser(name, help=(module.__doc__ or "").strip().splitlines()[0],
                       description=module.__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    module.add_arguments(p)
    p.set_defaults(study_module=module)


def build_parser() -> argparse.ArgumentParser:
    from .lab.config import add_config_arguments
    from .lab.studies import STUDIES

    parser = argparse.ArgumentParser(prog="negbatch", description="How should batches and negatives be formed in contrastive learning?")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    demo = commands.add_parser("demo", help="the negatives study on the digits data set (a few minutes on a laptop CPU)",
                               description="Run the negatives study on scikit-learn's digits and print where its report is.")
    demo.add_argument("--out", default="negbatch-runs/demo", help="study folder (default: negbatch-runs/demo)")
    demo.add_argument("--workers", type=int, default=2, help="worker processes (default: 2)")
    demo.add_argument("--seeds", default=DEMO["seeds"], help=f"comma list of seeds (default: {DEMO['seeds']})")
    demo.add_argument("--epochs", type=int, default=DEMO["epochs"], help=f"epochs per run (default: {DEMO['epochs']})")

    study = commands.add_parser("study", help="run a study: " + ", ".join(STUDIES), description="Run a study; rerunning it skips finished runs.")
    studies = study.add_subparsers(dest="study", metavar="STUDY", required=True)
    for name, module in STUDIES.items():
        _study_parser(studies, name, module)

    train = commands.add_parser("train", help="train one configuration", description="Train one configuration; options mirror the keys of a TOML/YAML/JSON --config file (command-line options win).")
    train.add_argument("--config", default=None, help="TOML, YAML or JSON file of training options (a run's config.json works)")
    train.add_argument("--out", default="negbatch-runs/train", help="run folder (default: negbatch-runs/train); an unfinished run there resumes")
    add_config_arguments(train)

    report = commands.add_parser("report", help="(re)write the report of a study or run folder", description="Write report.md and figures for a study folder or a finished training run.")
    report.add_argument("folder", help="study or run folder")
    return parser


def _demo(args: argparse.Namespace) -> Path:
    from .lab.studies import negatives

    parser = argparse.ArgumentParser()
    negatives.add_arguments(parser)
    argv = []
    for key, value in {**DEMO, "seeds": args.seeds, "epochs": args.epochs}.items():
        argv += [f"--{key.replace('_', '-')}", str(value)]
    argv += ["--out", args.out, "--workers", str(args.workers)]
    return negatives.run(parser.parse_args(argv))


# Studies whose text-pair version lives in a module of its own: `study NAME --data
# bible|builtin|pairs:PATH` runs `text-NAME` (the negatives study dispatches itself).
_TEXT_STUDIES = {"gradcache": "text-gradcache", "batches": "text-batches"}


def _is_text_data(value: str) -> bool:
    return value in ("bible", "builtin") or value.startswith("pairs:")


def route_text_studies(argv: list[str]) -> list[str]:
    """``study gradcache --data bible ...`` -> ``study text-gradcache --data bible ...``."""
    if len(argv) < 2 or argv[0] != "study" or argv[1] not in _TEXT_STUDIES:
        return argv
    for i, arg in enumerate(argv):
        value = arg.split("=", 1)[1] if arg.startswith("--data=") else (argv[i + 1] if arg == "--data" and i + 1 < len(argv) else None)
        if value is not None and _is_text_data(value):
            return [argv[0], _TEXT_STUDIES[argv[1]], *argv[2:]]
    return argv


def main(argv: list[str] | None = None) -> int:
    argv = route_text_studies(list(sys.argv[1:] if argv is None else argv))
    args = build_parser().parse_args(argv)
    try:
        if args.command == "demo":
            start = time.perf_counter()
            folder = _demo(args)
            print(f"demo finished in {time.perf_counter() - start:.0f} s; report: {folder / 'report.md'}")
        elif args.command == "study":
            folder = args.study_module.run(args)
            print(f"report: {folder / 'report.md'}")
        elif args.command == "train":
            from .lab import load_config_file, train
            from .lab.config import config_from_args
            from .lab.report import make_report

            base = load_config_file(args.config) if args.config else {}
            if not hasattr(args, "progress") and "progress" not in base and sys.stderr.isatty():
                base["progress"] = True  # a progress bar when someone is watching
            cfg = config_from_args(args, base)
            summary = train(cfg, args.out)
            assert summary is not None
            report = make_report(args.out)
            print(f"linear accuracy {summary['linear_acc']:.4f}, kNN accuracy {summary['knn_acc']:.4f}; report: {report}")
        elif args.command == "report":
            from .lab.report import make_report

            print(f"report: {make_report(args.folder)}")
    except (ValueError, FileNotFoundError, TypeError, ModuleNotFoundError) as err:  # the last: a missing extra
        print(f"negbatch {args.command}: error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
