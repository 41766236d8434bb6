"""One thread setting that means the same to every engine.

``threads`` defaults to the physical cores this process may run on. Before an
engine loads, the OpenMP and BLAS variables are set to agree, so that no library
in the process starts a pool of another size; with pinning, the opening thread (and
every thread it starts from then on) is bound to one logical CPU per physical core.
Both are given back when the engine closes, unless something has changed them since:
the variables as they were, and the opening thread's CPUs. Libraries that read the
variables when they loaded (OpenMP) keep the pool they made; threads started meanwhile
keep their CPUs.
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

    def apply_to_process(self) -> ProcessChange:
        """Set the thread variables (and pinning) for this process; the change's ``undo`` gives them back."""
        environment = {name: str(self.threads) for name in THREAD_ENV_VARS}
        change = ProcessChange({name: os.environ.get(name) for name in environment}, environment, None, None)
        os.environ.update(environment)
        if self.pin and hasattr(os, "sched_setaffinity"):
            change.cpus_before = os.sched_getaffinity(0)
            change.cpus_set = set(self.pinned_cpus())
            os.sched_setaffinity(0, change.cpus_set)
        return change

    def pinned_cpus(self) -> list[int]:
        """One logical CPU per physical core, first ``threads`` of them."""
        cpus = available_cpus()
        stride = max(1, len(cpus) // physical_cores())
        return cpus[::stride][: self.threads]


@dataclass
class ProcessChange:
    """What one engine set for the process, and what was there before: undone on close where
    nothing else has changed it since (engines open and close in any order)."""

    environment_before: dict[str, str | None]
    environment_set: dict[str, str]
    cpus_before: set[int] | None
    cpus_set: set[int] | None

    def undo(self) -> None:
        for name, value in self.environment_set.items():
            if os.environ.get(name) == value:
                before = self.environment_before[name]
                if before is None:
                    os.environ.pop(name, None)
                else:
                    os.environ[name] = before
        if self.cpus_set is not None and self.cpus_before is not None and os.sched_getaffinity(0) == self.cpus_set:
            os.sched_setaffinity(0, self.cpus_before)
