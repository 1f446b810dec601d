"""Test setup: simulate an 8-device mesh on the CPU before jax is imported."""

import os
import tempfile

# Tests are dominated by compiling many small programs, not by running them: skip LLVM's
# expensive optimisations (2-3x faster compiles; results agree to float32 rounding) and
# XLA:CPU's MLIR fusion emitters (the classic emitters compile a model's gradient in about
# half the CPU time).
os.environ["XLA_FLAGS"] = (
  os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
  " --xla_backend_optimization_level=0 --xla_llvm_disable_expensive_passes=true"
  " --xla_cpu_use_fusion_emitters=false"
).strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")
# One persistent XLA compilation cache shared by the xdist workers and by the subprocesses the
# CLI tests start: a program compiled by one test (the same train step, a reference layer) is
# loaded, not recompiled, by the next. Entries are keyed by the HLO and compile options.
os.environ.setdefault(
  "JAX_COMPILATION_CACHE_DIR",
  os.path.join(tempfile.gettempdir(), f"moejax-test-xla-cache-{os.getuid()}"),
)
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES", "0")

import pytest  # noqa: E402


@pytest.fixture(scope="session")
def data_dir(tmp_path_factory) -> str:
  """A TFDS data_dir shared by the session; the tiny corpus is prepared there on first use."""
  return str(tmp_path_factory.mktemp("tensorflow_datasets"))
