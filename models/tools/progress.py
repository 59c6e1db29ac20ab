"""Progress bars for the offline tools (tqdm, from the ``tools`` extra, when installed)."""

from __future__ import annotations

from typing import Any


def progress(iterable: Any, *, total: int | None = None, desc: str = "", enabled: bool = True, initial: int = 0) -> Any:
    """tqdm when installed and enabled, else the iterable itself; ``initial``: steps already done
    (a resumed epoch), counted in the bar but not in ``iterable``."""
    if not enabled:
        return iterable
    try:
        from tqdm.auto import tqdm
    except ImportError:
        return iterable
    return tqdm(iterable, total=total, desc=desc, dynamic_ncols=True, mininterval=1.0, initial=initial)
