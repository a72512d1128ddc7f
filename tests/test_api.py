"""The public namespace: `import tna_jax as tj` names the library's own functions, lazily."""

import collections
import pathlib
import subprocess
import sys

import pytest

import tna_jax as tj


@pytest.mark.parametrize("name", tj.__all__)
def test_every_public_name_resolves_to_the_library_object(name):
  value = getattr(tj, name)
  assert callable(value) or name in ("federated",)
  assert name in dir(tj)


def test_importing_the_package_imports_no_jax():
  """`python -m tna_jax.main --help` and error messages stay fast: names load on first use."""
  code = "import sys, tna_jax; print('jax' in sys.modules)"
  assert subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip() == "False"


def test_an_unknown_name_is_an_attribute_error():
  with pytest.raises(AttributeError, match="no attribute 'lmc_curves'"):
    tj.lmc_curves  # pylint: disable=pointless-statement


def test_no_two_modules_or_packages_of_the_library_share_a_name():
  """`tna_jax/bench/matching.py` beside `tna_jax/alignment/matching.py` made tracebacks and
  imports ambiguous: every module and subpackage name is used once in the package."""
  package = pathlib.Path(tj.__file__).parent
  names = [p.stem for p in package.rglob("*.py") if p.stem not in ("__init__", "__main__")]
  names += [p.name for p in package.rglob("*") if p.is_dir() and (p / "__init__.py").exists() and p != package]
  repeated = sorted(n for n, count in collections.Counter(names).items() if count > 1)
  assert not repeated, f"module names used more than once in tna_jax: {repeated}"
