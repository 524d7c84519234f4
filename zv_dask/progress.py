"""Progress display: Dask's own bar in notebooks, a terminal bar elsewhere."""

from __future__ import annotations

import sys

__all__ = ["show_progress"]


def _in_notebook() -> bool:
    try:
        from IPython import get_ipython
        shell = get_ipython()
        return shell is not None and type(shell).__name__ == "ZMQInteractiveShell"
    except ImportError:
        return False


def show_progress(futures, label: str) -> None:
    """Block until ``futures`` finish, showing a bar labelled ``label``."""
    if _in_notebook():
        from distributed import progress
        print(label)
        progress(futures, notebook=True)
        return
    from distributed import as_completed
    from tqdm import tqdm

    with tqdm(total=len(futures), desc=label, unit="task", file=sys.stderr, leave=True) as bar:
        for _ in as_completed(futures):
            bar.update(1)
