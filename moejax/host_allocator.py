"""Host allocator settings for runs on XLA:CPU: reuse freed memory instead of page-faulting it.

XLA:CPU allocates each executable's temporaries as one block per call (``posix_memalign``)
from the calling thread's glibc arena, and frees it when the call ends. Arenas other than
the main one cannot hold a block over 64 MiB, so glibc maps such a block with ``mmap`` and
unmaps it on free: every call then page-faults its whole temporary block afresh (the
kernel zeroes each 4 KiB page on first touch). Measured on a 2-core CPU, one
Mixtral-shaped MoE layer step (96 MiB of temporaries) took ~28k page faults and 80-90 ms
of kernel time per call, and the tiny training run lost ~15% of its steps/s to it.

``keep_freed_memory()`` sets, through glibc's ``mallopt``:
  M_ARENA_MAX = 1        every thread allocates from the main arena (one heap, grown by
                         ``brk``, no size limit),
  M_MMAP_MAX = 0         no block is ever mapped on its own,
  M_TRIM_THRESHOLD = 2^31 - 1  freed memory at the top of the heap is kept,
so a freed temporary block is reused by the next call with its pages already mapped. The
cost: the process keeps its peak host memory until it exits (fine for a training or
benchmark process; not for a long-lived process with one large transient peak).

It only works before XLA's CPU client starts its threads (the first computation,
``jax.devices()``): threads that already allocated keep their arenas. With an accelerator
(GPU/TPU) the temporaries live in device memory, so ``'auto'`` leaves the allocator alone
there.
"""

from __future__ import annotations

import ctypes
import importlib.metadata
import importlib.util
import logging
import platform

import jax
from jax._src import xla_bridge  # private: only to tell whether the backends started

MODES = ("auto", "keep", "system")

# glibc's mallopt parameters (malloc.h).
_M_TRIM_THRESHOLD = -1
_M_MMAP_MAX = -4
_M_ARENA_MAX = -8


def _cpu_only(jax_platforms: str | None = None) -> bool:
  """True when this process's JAX will run on the CPU: jax_platforms (default: the config,
  i.e. JAX_PLATFORMS) names cpu first, or (unset) no TPU library and no accelerator plugin
  is installed."""
  if jax_platforms is None:
    jax_platforms = jax.config.jax_platforms or ""
  platforms = [p.strip() for p in jax_platforms.split(",") if p.strip()]
  if platforms:
    return platforms[0] == "cpu"
  if importlib.util.find_spec("libtpu") is not None:
    return False
  return not importlib.metadata.entry_points(group="jax_plugins")


def _backends_started() -> bool:
  started = getattr(xla_bridge, "backends_are_initialized", None)
  return bool(started and started())


def keep_freed_memory() -> bool:
  """Applies the settings above; False (and nothing changed) where glibc's ``mallopt`` is
  unavailable (not Linux/glibc)."""
  if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
    return False
  mallopt = getattr(ctypes.CDLL(None), "mallopt", None)
  if mallopt is None:
    return False
  settings = ((_M_ARENA_MAX, 1), (_M_MMAP_MAX, 0), (_M_TRIM_THRESHOLD, 2**31 - 1))
  return all(mallopt(param, value) == 1 for param, value in settings)


def configure(mode: str = "auto") -> bool:
  """Sets the host allocator for this process; returns whether freed memory is now kept.

  mode: 'keep' (``keep_freed_memory``), 'system' (leave glibc's defaults) or 'auto' ('keep'
  when JAX will run on the CPU, see ``_cpu_only``). Call it before the first computation;
  after one it only logs a warning (for 'keep') and returns False.
  """
  if mode not in MODES:
    raise ValueError(f"host allocator mode {mode!r} is invalid: expected one of {MODES}")
  if mode == "system" or (mode == "auto" and not _cpu_only()):
    return False
  if _backends_started():
    if mode == "keep":
      logging.warning("host allocator: JAX's backends already started; settings not applied")
    return False
  kept = keep_freed_memory()
  if kept:
    logging.info("host allocator: freed memory is kept for reuse (moejax/host_allocator.py)")
  return kept
