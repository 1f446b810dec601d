"""Checkpoint conversion: reshard, Hugging Face export/import, upcycle, merge experts."""
