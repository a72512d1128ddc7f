"""The README's Python example runs as written (on a subset, for one epoch)."""

import pathlib
import re

from tna_jax.alignment import interpolation

README = pathlib.Path(__file__).resolve().parent.parent / "README.md"


def test_readme_python_example_runs():
  section = README.read_text().split("## Using it from Python", 1)[1]
  code = re.search(r"```python\n(.*?)```", section, re.S).group(1)
  shrunk = code.replace('tj.load_dataset("fashion_mnist")', 'tj.load_dataset("fashion_mnist").subset(1024, 500)')
  shrunk = shrunk.replace("num_epochs=10", "num_epochs=1")
  assert shrunk != code, "the README example changed: update this test's substitutions"
  namespace = {}
  exec(compile(shrunk, str(README), "exec"), namespace)  # pylint: disable=exec-used
  assert set(namespace["history"][-1]["test_accuracy"].shape) == {2}
  assert namespace["tj"].barriers is interpolation.barriers  # the public name is the library function
