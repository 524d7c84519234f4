"""Progress display: Dask's own bar in notebooks, a terminal bar elsewhere."""

from __future__ import annotations

import sys

__all__ = ["show_progress", "compute_with_progress"]


def _in_notebook() -> bool:
    try:
        from IPython import get_ipython
        shell = get_ipython()
        return shell is not None and type(shell).__name__ == "ZMQInteractiveShell"
    except ImportError:
        return False


def _has_widgets() -> bool:
    try:
        import ipywidgets  # noqa: F401
    except ImportError:
        return False
    return True


def show_progress(futures, label: str) -> None:
    """Block until ``futures`` finish, showing a bar labelled ``label``.

    Works with any client, including one that is not the default client.
    In a notebook with ipywidgets this is Dask's widget; otherwise a tqdm bar
    on stderr.
    """
    futures = list(futures)
    if not futures:
        return
    if _in_notebook() and _has_widgets():
        from distributed import progress
        print(label)
        progress(futures, notebook=True)
        return
    import time

    from distributed import as_completed
    from tqdm import tqdm

    loop = getattr(getattr(futures[0], "client", None), "loop", None)
    if not sys.stderr.isatty():  # a log file: a line when it starts and one when it ends, no bar frames
        t = time.perf_counter()
        print(f"{label}: {len(futures)} tasks", file=sys.stderr, flush=True)
        for _ in as_completed(futures, loop=loop):
            pass
        print(f"{label}: done in {time.perf_counter() - t:.1f} s", file=sys.stderr, flush=True)
        return
    with tqdm(total=len(futures), desc=label, unit="task", file=sys.stderr, leave=True) as bar:
        for _ in as_completed(futures, loop=loop):
            bar.update(1)


def compute_with_progress(objs, label: str) -> list:
    """``dask.compute(*objs)`` on the current local scheduler, with a bar (a terminal) or two lines (a log) on
    stderr."""
    import time

    import dask

    if not sys.stderr.isatty():
        t = time.perf_counter()
        print(f"{label}: {len(objs)} tasks", file=sys.stderr, flush=True)
        out = list(dask.compute(*objs))
        print(f"{label}: done in {time.perf_counter() - t:.1f} s", file=sys.stderr, flush=True)
        return out
    from dask.diagnostics import ProgressBar

    print(label, file=sys.stderr, flush=True)
    with ProgressBar(out=sys.stderr):
        return list(dask.compute(*objs))
