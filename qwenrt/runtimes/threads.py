"""One thread setting that means the same to every engine.

``threads`` defaults to the physical cores this process may run on. Before an
engine loads, the OpenMP and BLAS variables are set to agree, so that no library
in the process starts a pool of another size; with pinning, the process is bound to
one logical CPU per physical core.
"""

from __future__ import annotations

import os
import warnings
from dataclasses import dataclass

import psutil

from qwenrt.errors import QwenrtError

THREAD_ENV_VARS = ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS", "NUMEXPR_NUM_THREADS")


def available_cpus() -> list[int]:
    try:
        return sorted(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return list(range(os.cpu_count() or 1))


def physical_cores() -> int:
    """Physical cores this process may use (logical CPUs when the count is unknown)."""
    logical = len(available_cpus())
    physical = psutil.cpu_count(logical=False) or logical
    per_core = max(1, (psutil.cpu_count(logical=True) or logical) // physical)
    return max(1, min(physical, logical // per_core))


@dataclass(frozen=True)
class ThreadPlan:
    threads: int
    pin: bool = False

    @classmethod
    def resolve(cls, threads: int | None, pin: bool = False) -> ThreadPlan:
        """Check a requested count. Rule: 0 or less is an error; more than the machine's
        logical CPUs is an error; more than its physical cores is allowed with a warning."""
        if threads is None:
            return cls(physical_cores(), pin)
        if threads < 1:
            raise QwenrtError(
                f"threads must be 1 or more, not {threads}; this machine allows 1 to {len(available_cpus())}"
            )
        logical = len(available_cpus())
        if threads > logical:
            raise QwenrtError(
                f"threads={threads} is more than the {logical} CPUs this process may use; use 1 to {logical}"
            )
        if threads > physical_cores():
            warnings.warn(
                f"threads={threads} exceeds the {physical_cores()} physical cores; hyper-threads rarely help decode",
                stacklevel=2,
            )
        return cls(threads, pin)

    def apply_to_process(self) -> None:
        for name in THREAD_ENV_VARS:
            os.environ[name] = str(self.threads)
        if self.pin and hasattr(os, "sched_setaffinity"):
            os.sched_setaffinity(0, self.pinned_cpus())

    def pinned_cpus(self) -> list[int]:
        """One logical CPU per physical core, first ``threads`` of them."""
        cpus = available_cpus()
        stride = max(1, len(cpus) // physical_cores())
        return cpus[::stride][: self.threads]
