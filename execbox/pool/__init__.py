"""Warm sandbox pools."""

from execbox.pool.pool import PoolStats, SandboxPool

__all__ = ["PoolStats", "SandboxPool"]
