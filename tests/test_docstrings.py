"""Every docstring example in the library runs (the examples are the docs)."""

from __future__ import annotations

import doctest
import importlib
import pkgutil

import pytest

import negbatch

MODULES = sorted(m.name for m in pkgutil.walk_packages(negbatch.__path__, "negbatch."))


@pytest.mark.parametrize("name", MODULES)
def test_docstring_examples_run(name):
    try:
        module = importlib.import_module(name)
    except ImportError as exc:  # an optional extra (text, sentence-transformers) is absent
        pytest.skip(f"{name}: {exc}")
    result = doctest.testmod(module, optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE, verbose=False)
    assert result.failed == 0, f"{result.failed} docstring example(s) failed in {name}"
