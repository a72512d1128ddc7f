"""docs/config_keys.md documents every config key and is current."""

from tna_jax import config_docs


def test_every_config_key_is_documented_and_nothing_documented_is_stale():
  undocumented, stale = config_docs.undocumented_and_stale()
  assert not undocumented, f"document these keys in tna_jax/config_docs.py KEYS: {sorted(undocumented)}"
  assert not stale, f"these documented keys exist in no config: {sorted(stale)}"


def test_config_keys_md_is_current():
  assert config_docs.DOCS_PATH.read_text() == config_docs.render(), (
      "docs/config_keys.md is out of date: run `python -m tna_jax.config_docs`")
