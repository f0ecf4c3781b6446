"""Hugging Face files that `dualjax.export` copies next to exported weights (needs torch and
transformers; dualjax itself never imports this package)."""
