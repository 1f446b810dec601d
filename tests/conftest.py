"""Test setup: simulate an 8-device mesh on the CPU before jax is imported."""

import os

os.environ["XLA_FLAGS"] = (
  os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
).strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import pytest  # noqa: E402


@pytest.fixture(scope="session")
def data_dir(tmp_path_factory) -> str:
  """A TFDS data_dir shared by the session; the tiny corpus is prepared there on first use."""
  return str(tmp_path_factory.mktemp("tensorflow_datasets"))
