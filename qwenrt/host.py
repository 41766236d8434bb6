"""The machine qwenrt runs on, as far as the engines care: its CPU, the CPU's features, the kernel.

The host key names a machine kind for everything qwenrt learns by running on it (the
probe's outcomes, ``qwenrt tune``'s profiles): the same key means the same CPU model,
the same instruction-set features and the same kernel, so what held there holds here.
"""

from __future__ import annotations

import hashlib
import platform
from dataclasses import dataclass
from functools import cache
from typing import Any

from qwenrt import procfs

# The features that decide which kernels the engines run (and which of them can crash).
FEATURES_THAT_MATTER = ("avx2", "avx512f", "avx512_vnni", "avx_vnni", "avx512_bf16", "avx512_fp16", "amx_tile",
                        "amx_int8", "amx_bf16", "amx_fp16")  # fmt: skip


@dataclass(frozen=True)
class Host:
    cpu: str
    flags: frozenset[str]
    kernel: str
    machine: str
    physical_cores: int

    def has(self, feature: str) -> bool:
        return feature in self.flags

    @property
    def key(self) -> str:
        """A short name for this kind of machine: CPU model, every CPU flag, kernel and architecture."""
        text = "\n".join([self.cpu, " ".join(sorted(self.flags)), self.kernel, self.machine])
        return hashlib.sha256(text.encode()).hexdigest()[:16]

    def features(self) -> list[str]:
        """The features that matter to the engines, in a fixed order, for reports."""
        return [name for name in FEATURES_THAT_MATTER if name in self.flags]

    def describe(self) -> dict[str, Any]:
        return {"key": self.key, "cpu": self.cpu, "features": self.features(), "kernel": self.kernel,
                "machine": self.machine, "physical_cores": self.physical_cores}  # fmt: skip


@cache
def this_host() -> Host:
    from qwenrt.runtimes.threads import physical_cores

    cpu, flags = procfs.cpuinfo()
    return Host(cpu or platform.processor() or platform.machine(), flags, platform.release(), platform.machine(),
                physical_cores())  # fmt: skip
