"""One partition of points in memory: what every reader produces and the shuffle moves."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

__all__ = ["Batch"]


@dataclass
class Batch:
    """One partition of points in memory."""

    positions: np.ndarray
    attributes: dict = field(default_factory=dict)
    object_ids: np.ndarray | None = None
    cells: np.ndarray | None = None  # grid cell id of every point, once the split has binned them
    fragments: np.ndarray | None = None  # and its bin inside the chunk

    def __len__(self) -> int:
        return len(self.positions)

    def take(self, idx) -> Batch:
        def pick(a):
            return None if a is None else np.take(a, idx, axis=0)

        return Batch(pick(self.positions), {k: pick(v) for k, v in self.attributes.items()}, pick(self.object_ids),
                     pick(self.cells), pick(self.fragments))
