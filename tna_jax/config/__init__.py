"""Config keys declared once (schema: type, bounds, meaning, where each applies), the family
defaults and presets of configs/ (defaults), and the generated docs/config_keys.md (docs)."""
