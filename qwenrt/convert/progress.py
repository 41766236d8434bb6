"""Progress bars for the long conversion steps, on standard error."""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from typing import TypeVar

from tqdm import tqdm

T = TypeVar("T")


def progress_bar(items: Iterable[T], *, total: int | None, desc: str, unit: str) -> Iterator[T]:
    yield from tqdm(items, total=total, desc=desc, unit=unit, leave=False, dynamic_ncols=True)


def byte_bar(total: int, desc: str) -> tqdm:
    # Small files finish before a bar could say anything.
    return tqdm(
        total=total, desc=desc, unit="B", unit_scale=True, unit_divisor=1024, leave=False, disable=total < 64 * 2**20
    )
