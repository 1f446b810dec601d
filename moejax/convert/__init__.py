"""Checkpoint conversion: reshard onto another mesh, Hugging Face export/import, and the
``moejax-convert`` command line."""
