"""The package list, which pyproject.toml cannot express: tna_jax's packages plus the
checkout's configs/ shipped as tna_jax.configs, so that after `pip install` a packaged config
resolves by name (`--config=fmnist_mlp`) from any directory. configs/ stays the one source."""

from setuptools import find_packages, setup

setup(packages=find_packages(include=["tna_jax*"]) + ["tna_jax.configs"], package_dir={"tna_jax.configs": "configs"})
