"""docs/config_keys.md documents every config key (through its declaration) and is current."""

from tna_jax.config import docs


def test_every_config_key_is_declared_and_no_declaration_is_stale():
  undeclared, stale = docs.undeclared_and_stale()
  assert not undeclared, f"declare these keys in tna_jax/config/schema.py KEYS: {sorted(undeclared)}"
  assert not stale, f"these declared keys exist in no config of their experiment: {sorted(stale)}"


def test_config_keys_md_is_current():
  assert docs.DOCS_PATH.read_text() == docs.render(), (
      "docs/config_keys.md is out of date: run `python -m tna_jax.config.docs`")
