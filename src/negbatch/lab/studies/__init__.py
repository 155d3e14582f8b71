"""Studies: the registry behind ``negbatch study NAME`` and ``negbatch report FOLDER``.

One registry keyed by (study, modality): ``negbatch study NAME --data D``
runs the entry of ``NAME`` and the modality of the data set ``D``
(:func:`negbatch.lab.config.task_of`: ``bible``, ``builtin``, ``pairs:PATH``
are text, the rest images), so every study routes its text version the same
way. Each entry is a :class:`~negbatch.lab.studies.base.Study` subclass,
imported only when used. A study folder's ``study.json`` names its study and
modality, which is how :func:`report_folder` finds the report to rewrite.

A new study, or a study's version for another modality, is one subclass of
:class:`~negbatch.lab.studies.base.Study` and one entry in :data:`STUDIES`.
"""

from __future__ import annotations

import importlib
import json
import sys
from pathlib import Path

from ..config import dataset_problem, load_config_file, task_of
from ..folder import atomic_write_text

__all__ = ["STUDIES", "MODALITIES", "study_names", "modalities", "get_study", "modality_of_argv", "report_folder"]

MODALITIES = ("image", "text")

#: (study, modality) -> "module:class" under this package.
STUDIES: dict[tuple[str, str], str] = {
    ("negatives", "image"): "negatives:ImageNegatives",
    ("negatives", "text"): "text_negatives:TextNegatives",
    ("batches", "image"): "batches:ImageBatches",
    ("batches", "text"): "text_batches:TextBatches",
    ("gradcache", "image"): "gradcache:ImageGradCache",
    ("gradcache", "text"): "text_gradcache:TextGradCache",
    ("bias", "image"): "bias:BiasStudy",
    ("batch-size", "image"): "batch_size:ImageBatchSize",
    ("batch-size", "text"): "batch_size:TextBatchSize",
}

_DATASET_EXAMPLE = {"image": "digits", "text": "bible"}


def study_names() -> list[str]:
    """Every study's name, in registry order."""
    return list(dict.fromkeys(name for name, _ in STUDIES))


def modalities(name: str) -> list[str]:
    """The modalities ``name`` runs on."""
    return [m for n, m in STUDIES if n == name]


def get_study(name: str, modality: str):
    """The study ``name`` on ``modality`` data (an instance), or a ValueError that says what exists."""
    if name not in study_names():
        raise ValueError(f"unknown study {name!r}; expected one of {', '.join(study_names())}")
    if (name, modality) not in STUDIES:
        have = modalities(name)
        raise ValueError(
            f"the {name} study runs on {' and '.join(have)} data only, not on {modality} data; give an "
            f"{' or '.join(have)} data set (e.g. --data {_DATASET_EXAMPLE[have[0]]})"
        )
    module, cls = STUDIES[(name, modality)].split(":")
    return getattr(importlib.import_module(f"{__name__}.{module}"), cls)()


def option_value(argv: list[str], names: tuple[str, ...]) -> str | None:
    """The last value of any of ``names`` in ``argv`` (``--name V`` or ``--name=V``)."""
    value = None
    for i, arg in enumerate(argv):
        if arg in names and i + 1 < len(argv):
            value = argv[i + 1]
        elif "=" in arg and arg.split("=", 1)[0] in names:
            value = arg.split("=", 1)[1]
    return value


def modality_of_argv(argv: list[str]) -> str:
    """The modality a study's command line asks for: the task of its ``--data``
    / ``--dataset``, else of its ``--config`` file's ``dataset``, else images."""
    dataset = option_value(argv, ("--data", "--dataset"))
    # An unknown name first: taken for images, a text study's options would read as unrecognized.
    problem = dataset_problem(dataset) if dataset is not None else None
    if problem:
        raise ValueError(f"--data: {problem}")
    config = option_value(argv, ("--config",))
    if dataset is None and config is not None:
        try:
            dataset = load_config_file(config).get("dataset")
        except ValueError:
            dataset = None  # the study reports the bad file itself
    return task_of(dataset) if isinstance(dataset, str) else "image"


def _mark_missing_runs(report: Path, spec: dict, folder: Path) -> None:
    """Say, under a partial report's title, how many of the plan's runs it lacks (the
    batch-size report says it itself)."""
    from ..sweep import read_results

    planned = spec.get("planned_runs")
    text = report.read_text()
    if not planned or "runs missing" in text:
        return
    missing = planned - len(read_results(folder))
    if missing <= 0:
        return
    title, _, rest = text.partition("\n")
    line = (f"**{missing} of {planned} runs missing** (an interrupted study: rerun the same command to finish it; "
            "this report covers the finished runs).")
    atomic_write_text(report, f"{title}\n\n{line}\n{rest}")
    print(line.replace("**", ""), file=sys.stderr)


def report_folder(folder: str | Path) -> Path:
    """(Re)write the report of a study folder (its study's report) or of a finished run.

    Returns the report's path. A folder that does not exist, or holds neither
    a study nor a finished run, is a ValueError that says so.
    """
    from ..report import run_report
    from ..folder import CHECKPOINT, CONFIG, SUMMARY

    folder = Path(folder)
    if not folder.exists():
        raise ValueError(f"{folder} does not exist; give a study folder (with study.json) or a finished run "
                         f"folder (with summary.json)")
    if not folder.is_dir():
        raise ValueError(f"{folder} is a file; give a study folder (with study.json) or a run folder")
    if (folder / "study.json").exists():
        try:
            spec = json.loads((folder / "study.json").read_text())
        except ValueError as err:
            raise ValueError(f"{folder / 'study.json'} is damaged (not valid JSON: {err}): run the study's command "
                             f"again (it rewrites study.json, skips the finished runs and writes the report)") from None
        path = get_study(spec["study"], spec.get("modality", "image")).report(folder)
        _mark_missing_runs(path, spec, folder)
        return path
    if (folder / SUMMARY).exists():
        return run_report(folder)
    if (folder / CONFIG).exists():  # an interrupted run: say how to finish it, not only what is missing
        resume = " (it resumes from its checkpoint)" if (folder / CHECKPOINT).exists() else ""
        raise ValueError(f"{folder} holds a run that has not finished (no summary.json): run the command that "
                         f"started it again (negbatch train, or the study's) to finish it{resume}; it writes the "
                         f"report at the end")
    raise ValueError(f"{folder} is neither a study folder (no study.json) nor a finished run (no summary.json)")
