"""moejax.host_allocator: with freed memory kept, XLA:CPU's per-call temporaries stop being
page-faulted afresh on every call; with glibc's defaults they are (the premise)."""

import json
import os
import subprocess
import sys

import jax
import pytest

from moejax import host_allocator

# A jitted call with one 96 MiB temporary (the scaled input, before a matrix-vector product
# reads it), run 9 times after 5 warm-up calls; prints the median call's minor page faults and
# the temporary's 4 KiB pages.
_CHILD = r"""
import json, resource, sys
from moejax import host_allocator
kept = host_allocator.configure(sys.argv[1])
import jax, jax.numpy as jnp
x = jnp.ones((24 * 2**20,), jnp.float32)
f = jax.jit(lambda x: jnp.dot(x.reshape(6144, 4096) * 2.0, jnp.ones((4096,), jnp.float32)).sum())
c = f.lower(x).compile()
temp = c.memory_analysis().temp_size_in_bytes
for _ in range(5):
  c(x).block_until_ready()
faults = []
for _ in range(9):
  before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
  c(x).block_until_ready()
  faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
faults = sorted(faults)[4]  # the median call (the heap may still grow once or twice)
late = host_allocator.configure("keep")
print(json.dumps(dict(kept=kept, faults=faults, pages=temp / 4096, late=late)))
"""


def _run_child(mode: str) -> dict:
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  out = subprocess.run(
    [sys.executable, "-c", _CHILD, mode], env=env, capture_output=True, text=True, check=True
  )
  return json.loads(out.stdout.strip().splitlines()[-1])


@pytest.mark.skipif(sys.platform != "linux", reason="glibc's mallopt is Linux-only")
def test_kept_memory_is_not_page_faulted_each_call():
  system, kept = _run_child("system"), _run_child("auto")  # auto = keep on the CPU
  assert system["pages"] >= 24 * 2**20 * 4 / 4096
  assert not system["kept"] and kept["kept"]
  # glibc's defaults: the temporary is mapped afresh, so most of its pages fault each call.
  assert system["faults"] > 0.5 * system["pages"], system
  # Kept: the freed block is reused with its pages mapped; almost no faults.
  assert kept["faults"] < 0.05 * kept["pages"], (kept, system)
  assert kept["late"] is False  # after the first computation the settings are refused


def test_bad_mode_names_the_allowed_values():
  with pytest.raises(ValueError, match=r"'bogus' is invalid: expected one of \('auto', 'keep'"):
    host_allocator.configure("bogus")


def test_auto_follows_the_platform():
  assert host_allocator._cpu_only("cpu")
  assert not host_allocator._cpu_only("cuda,cpu")
  assert host_allocator._cpu_only()  # the tests set JAX_PLATFORMS=cpu (conftest)
  # In this test process jax already ran: auto (which would keep on the CPU) and keep
  # change nothing and say so.
  jax.devices()
  assert host_allocator.configure("auto") is False
  assert host_allocator.configure("keep") is False
