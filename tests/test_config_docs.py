"""docs/config_keys.md documents every config key (through its declaration) and is current."""

from tna_jax import config_docs


def test_every_config_key_is_declared_and_no_declaration_is_stale():
  undeclared, stale = config_docs.undeclared_and_stale()
  assert not undeclared, f"declare these keys in tna_jax/config_keys.py KEYS: {sorted(undeclared)}"
  assert not stale, f"these declared keys exist in no config of their experiment: {sorted(stale)}"


def test_config_keys_md_is_current():
  assert config_docs.DOCS_PATH.read_text() == config_docs.render(), (
      "docs/config_keys.md is out of date: run `python -m tna_jax.config_docs`")
