"""Progress display: Dask's own bar in notebooks, a terminal bar elsewhere, lines in a log.

In a log (stderr not a terminal) a stage says when it starts and when it is
done: through the ``zv_dask`` logger when the application logs it at INFO
(``logging.basicConfig(level="INFO")``, a cluster job's log), else on stderr.
The jobs log their milestones to the same logger (:data:`log`).
"""

from __future__ import annotations

import logging
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager

__all__ = ["task_bar", "compute_with_progress", "say", "log"]

log = logging.getLogger("zv_dask")


def say(text: str) -> None:
    """A progress line for a log: to :data:`log` when it is shown at INFO, else on stderr."""
    if log.isEnabledFor(logging.INFO) and log.hasHandlers():
        log.info(text)
    else:
        print(text, file=sys.stderr, flush=True)


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


@contextmanager
def task_bar(futures, label: str) -> Iterator[Callable[[], None]]:
    """A bar over ``futures`` while the block gathers them; yields ``tick()``, called once per finished task.

    The caller's own loop over the finished tasks drives it, so that what it does
    per task (a journal checkpoint) happens as each one finishes, and a failure
    ends the bar at once. In a notebook with ipywidgets it is Dask's widget
    (which follows the futures itself); on a terminal a tqdm bar on stderr; in a
    log two lines on stderr, when the stage starts and when it is done.
    """
    futures = list(futures)
    if _in_notebook() and _has_widgets():
        from distributed import progress

        print(label, file=sys.stderr)
        progress(futures, notebook=True)
        yield lambda: None
        return
    if not sys.stderr.isatty():
        t = time.perf_counter()
        say(f"{label}: {len(futures)} tasks")
        yield lambda: None
        say(f"{label}: done in {time.perf_counter() - t:.1f} s")
        return
    from tqdm import tqdm

    with tqdm(total=len(futures), desc=label, unit="task", file=sys.stderr, leave=True) as bar:

        def tick() -> None:
            bar.update(1)

        yield tick


def compute_with_progress(objs, label: str) -> list:
    """``dask.compute(*objs)`` on the current local scheduler, with a bar (a terminal) or two lines (a log) on
    stderr."""
    import dask

    if not sys.stderr.isatty():
        t = time.perf_counter()
        say(f"{label}: {len(objs)} tasks")
        out = list(dask.compute(*objs))
        say(f"{label}: done in {time.perf_counter() - t:.1f} s")
        return out
    from dask.diagnostics import ProgressBar

    print(label, file=sys.stderr, flush=True)
    with ProgressBar(out=sys.stderr):
        return list(dask.compute(*objs))
