"""Sizing a run before it exists: per-device memory from an AOT compile of the real step."""

from moejax.planning.memory import TARGETS_GIB, format_plan, plan_memory, sharded_bytes

__all__ = ["TARGETS_GIB", "format_plan", "plan_memory", "sharded_bytes"]
