"""Every docstring example in the library runs (the examples are the docs).

A module whose examples need an optional extra that is not installed (the
text extra's tokenizers, say) is skipped, naming the missing package.
"""

from __future__ import annotations

import doctest
import importlib
import pkgutil

import pytest

import negbatch

MODULES = sorted(m.name for m in pkgutil.walk_packages(negbatch.__path__, "negbatch."))
FLAGS = doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE


class _Runner(doctest.DocTestRunner):
    missing: set[str]

    def report_unexpected_exception(self, out, test, example, exc_info):
        if issubclass(exc_info[0], ModuleNotFoundError):
            self.missing.add(exc_info[1].name)
        super().report_unexpected_exception(out, test, example, exc_info)


@pytest.mark.parametrize("name", MODULES)
def test_docstring_examples_run(name):
    try:
        module = importlib.import_module(name)
    except ImportError as exc:  # an optional extra (text, sentence-transformers) is absent
        pytest.skip(f"{name}: {exc}")
    runner = _Runner(optionflags=FLAGS, verbose=False)
    runner.missing = set()
    for test in doctest.DocTestFinder().find(module, module.__name__):
        runner.run(test, out=lambda _: None)
    if runner.missing:
        pytest.skip(f"{name}: examples need {sorted(runner.missing)} (an optional extra)")
    assert runner.failures == 0, f"{runner.failures} docstring example(s) failed in {name}"


@pytest.mark.parametrize("name", sorted(negbatch.__all__))
def test_every_exported_object_has_an_example_that_runs_in_a_fresh_session(name):
    # With empty globals: an example that leans on its module's own imports fails here, as it
    # would when copied into a new session.
    obj = getattr(negbatch, name)
    if not callable(obj):
        pytest.skip(f"{name} is a constant")
    tests = [t for t in doctest.DocTestFinder(recurse=False).find(obj, name, globs={}) if t.examples]
    assert tests, f"negbatch.{name} has no docstring example"
    runner = doctest.DocTestRunner(optionflags=FLAGS, verbose=False)
    for test in tests:
        runner.run(test, out=lambda _: None)
    assert runner.failures == 0, f"negbatch.{name}'s example fails in a fresh session"
