"""The examples in the public docstrings run and print what they say."""
import doctest
import importlib

import pytest

MODULES = ["lipnorm.bn_modes", "lipnorm.models.norm_spec", "lipnorm.models.registry",
           "lipnorm.lipschitz"]


@pytest.mark.parametrize("name", MODULES)
@pytest.mark.slow
def test_docstring_examples(name):
  module = importlib.import_module(name)
  result = doctest.testmod(module, optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE)
  assert result.attempted > 0, f"{name} has no docstring examples"
  assert result.failed == 0
