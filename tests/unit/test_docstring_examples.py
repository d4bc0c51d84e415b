"""The docstring examples of the direction modules run (on tiny data) and give what they show."""
import doctest
import importlib

import pytest

MODULES = ["unveil.directions._base", "unveil.directions.baselines", "unveil.directions.pairs"]


@pytest.mark.parametrize("name", MODULES)
def test_docstring_examples_run(name):
    module = importlib.import_module(name)
    result = doctest.testmod(module, optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE, report=True)
    assert result.attempted > 0, f"{name} has no docstring examples"
    assert result.failed == 0, f"{result.failed} of {result.attempted} examples in {name} failed (see the output)"
