"""Studies: the registry behind ``negbatch study NAME``.

A study is a module with two functions (and optionally a third):

* ``add_arguments(parser: argparse.ArgumentParser) -> None`` adds its options;
* ``run(args: argparse.Namespace) -> pathlib.Path`` runs it (skipping
  finished runs when rerun) and returns its folder, which holds
  ``study.json`` (``{"study": NAME, ...}``), ``results.csv``/``results.json``
  and ``report.md``;
* ``report(folder: pathlib.Path) -> pathlib.Path`` (optional) rewrites the
  report from the folder alone; ``negbatch report FOLDER`` calls it.

A new study is one module here and one line in :data:`STUDIES`.
"""

from __future__ import annotations

from . import batches, bias, gradcache, negatives, text_batches, text_gradcache

__all__ = ["STUDIES"]

STUDIES = {
    "negatives": negatives,
    "gradcache": gradcache,
    "batches": batches,
    "bias": bias,
    # Text pairs: `study gradcache|batches --data bible|builtin|pairs:PATH` run these (see cli.py).
    "text-gradcache": text_gradcache,
    "text-batches": text_batches,
}
