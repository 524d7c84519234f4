"""ZV 0.9.2 metadata as typed objects, and the JSON dicts they become on disk.

``RootMetadata`` is the root group's ``zarr_vectors`` block plus the axes it
shares with the NGFF ``multiscales`` block; ``LevelMetadata`` is a level group's
``zarr_vectors_level`` block plus the bin geometry that lives in the NGFF
datasets. Builders for the ``multiscales`` and RFC-8 ``ome`` blocks and for the
per-array attributes sit beside them.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from zv_dask.errors import MetadataError

__all__ = [
    "ZV_VERSION",
    "LINK_STORAGE",
    "DEFAULT_AXES",
    "RootMetadata",
    "LevelMetadata",
    "multiscales_block",
    "ome_block",
    "vertices_attrs",
    "fragments_attrs",
    "attribute_attrs",
    "store_name",
]

ZV_VERSION = "0.9.2"
LINK_STORAGE = ("none", "implicit", "explicit")  # the root cross_level_storage values
DEFAULT_AXES = ("x", "y", "z", "w")
VALID_COARSENING = ("none", "per_object", "manual")
_ROOT_DEFAULTS = {
    "links_convention": "implicit_sequential",
    "object_index_convention": "standard",
    "cross_chunk_strategy": "explicit_links",
}


def _floats(x) -> list[float]:
    return [float(v) for v in x]


@dataclass
class RootMetadata:
    """Root metadata of a points store."""

    chunk_shape: tuple[float, ...]
    bounds: tuple[tuple[float, ...], tuple[float, ...]]
    axes: list[dict] = field(default_factory=list)
    base_bin_shape: tuple[float, ...] | None = None
    geometry_types: list[str] = field(default_factory=lambda: ["point_cloud"])
    format_capabilities: list[str] = field(default_factory=list)
    zv_version: str = ZV_VERSION
    cross_level_depth: int = 0
    cross_level_storage: str = "none"
    crs: dict | None = None
    attribute_specs: dict | None = None
    reduction_factor: int | None = None
    extra: dict = field(default_factory=dict)

    def __post_init__(self):
        d = len(self.chunk_shape)
        if not self.axes:
            if d > len(DEFAULT_AXES):
                raise MetadataError(f"cannot name {d} axes by default (x, y, z, w); pass axes=")
            self.axes = [{"name": n, "type": "space"} for n in DEFAULT_AXES[:d]]
        self.validate()

    @property
    def ndim(self) -> int:
        return len(self.chunk_shape)

    sid_ndim = ndim

    @property
    def effective_bin_shape(self) -> tuple[float, ...]:
        return tuple(self.base_bin_shape) if self.base_bin_shape is not None else tuple(self.chunk_shape)

    @property
    def bins_per_chunk(self) -> tuple[int, ...]:
        return tuple(int(round(c / b)) for c, b in zip(self.chunk_shape, self.effective_bin_shape))

    @property
    def axis_names(self) -> list[str]:
        return [a["name"] for a in self.axes]

    def validate(self) -> None:
        d = self.ndim
        lo, hi = self.bounds
        problems = []
        if len(lo) != d or len(hi) != d:
            problems.append(f"bounds have {len(lo)}/{len(hi)} values but chunk_shape has {d}")
        if len(self.axes) != d:
            problems.append(f"{len(self.axes)} axes but chunk_shape has {d} values")
        if self.base_bin_shape is not None and len(self.base_bin_shape) != d:
            problems.append(f"base_bin_shape has {len(self.base_bin_shape)} values, chunk_shape {d}")
        if problems:
            raise MetadataError("inconsistent number of axes: " + "; ".join(problems))
        if any(not np.isfinite(c) or c <= 0 for c in self.chunk_shape):
            raise MetadataError(f"chunk_shape must be finite and > 0, got {list(self.chunk_shape)}")
        if any(not np.isfinite(v) for v in list(lo) + list(hi)):
            raise MetadataError(f"bounds must be finite, got {[list(lo), list(hi)]}")
        if any(a > b for a, b in zip(lo, hi)):
            raise MetadataError(f"bounds are inverted: min {list(lo)} exceeds max {list(hi)} on some axis")
        if self.base_bin_shape is not None:
            for c, b in zip(self.chunk_shape, self.base_bin_shape):
                if b <= 0 or abs(c / b - round(c / b)) > 1e-9 * max(1.0, c / b):
                    raise MetadataError(
                        f"base_bin_shape {list(self.base_bin_shape)} must divide chunk_shape "
                        f"{list(self.chunk_shape)} a whole number of times on every axis")
        if not re.fullmatch(r"\d+\.\d+\.\d+", self.zv_version):
            raise MetadataError(f"zv_version {self.zv_version!r} is not of the form X.Y.Z")

    def to_dict(self) -> dict[str, Any]:
        """The ``zarr_vectors`` block of the root attributes."""
        out: dict[str, Any] = {
            "zv_version": self.zv_version,
            "format_capabilities": list(self.format_capabilities),
            "chunk_shape": _floats(self.chunk_shape),
            "bounds": [_floats(self.bounds[0]), _floats(self.bounds[1])],
            "geometry_types": list(self.geometry_types),
        }
        if self.base_bin_shape is not None:
            out["base_bin_shape"] = _floats(self.base_bin_shape)
        out.update(_ROOT_DEFAULTS)
        out["cross_level_depth"] = int(self.cross_level_depth)
        out["cross_level_storage"] = self.cross_level_storage
        if self.reduction_factor is not None:
            out["reduction_factor"] = int(self.reduction_factor)
        if self.crs is not None:
            out["crs"] = self.crs
        if self.attribute_specs:
            out["attribute_specs"] = self.attribute_specs
        for k, v in self.extra.items():
            out.setdefault(k, v)
        return out

    @classmethod
    def from_attrs(cls, attrs: dict) -> RootMetadata:
        """Parse the root group attributes (``zarr_vectors`` plus ``multiscales`` axes)."""
        zv = attrs.get("zarr_vectors")
        if not isinstance(zv, dict):
            raise MetadataError("root attributes have no 'zarr_vectors' block: not a ZV store")
        missing = [k for k in ("zv_version", "chunk_shape", "bounds", "geometry_types") if k not in zv]
        if missing:
            raise MetadataError(f"root 'zarr_vectors' block lacks required keys {missing}")
        try:
            axes = attrs["multiscales"][0]["axes"]
        except (KeyError, IndexError, TypeError):
            axes = []
        known = {"zv_version", "chunk_shape", "bounds", "geometry_types", "base_bin_shape",
                 "format_capabilities", "cross_level_depth", "cross_level_storage", "crs",
                 "attribute_specs", "reduction_factor", *_ROOT_DEFAULTS}
        bounds = zv["bounds"]
        return cls(
            chunk_shape=tuple(float(c) for c in zv["chunk_shape"]),
            bounds=(tuple(float(v) for v in bounds[0]), tuple(float(v) for v in bounds[1])),
            axes=[dict(a) for a in axes],
            base_bin_shape=tuple(float(v) for v in zv["base_bin_shape"]) if zv.get("base_bin_shape") else None,
            geometry_types=list(zv["geometry_types"]),
            format_capabilities=list(zv.get("format_capabilities", [])),
            zv_version=str(zv["zv_version"]),
            cross_level_depth=int(zv.get("cross_level_depth", 1)),
            cross_level_storage=str(zv.get("cross_level_storage", "explicit")),
            crs=zv.get("crs"),
            attribute_specs=zv.get("attribute_specs"),
            reduction_factor=zv.get("reduction_factor"),
            extra={k: v for k, v in zv.items() if k not in known},
        )


@dataclass
class LevelMetadata:
    """One level's ``zarr_vectors_level`` block, plus its bin geometry (from NGFF)."""

    level: int
    vertex_count: int = 0
    arrays_present: list[str] = field(default_factory=lambda: ["vertices", "vertex_fragments"])
    object_sparsity: float = 1.0
    coarsening_method: str = "none"
    parent_level: int | None = None
    chunk_shape: tuple[float, ...] | None = None
    bin_shape: tuple[float, ...] | None = None
    bin_ratio: tuple[float, ...] | None = None
    fragments_tile: bool | None = None
    preserves_object_ids: bool | None = None
    inherited_num_objects: int | None = None
    shared_fragments: bool | None = None
    extra: dict = field(default_factory=dict)

    def validate(self) -> None:
        if self.level < 0:
            raise MetadataError(f"level must be >= 0, got {self.level}")
        if self.vertex_count < 0:
            raise MetadataError(f"vertex_count must be >= 0, got {self.vertex_count}")
        if not 0 < self.object_sparsity <= 1:
            raise MetadataError(f"object_sparsity must lie in (0, 1], got {self.object_sparsity}")
        if self.coarsening_method not in VALID_COARSENING:
            raise MetadataError(f"coarsening_method {self.coarsening_method!r} is not one of {VALID_COARSENING}")

    def to_dict(self) -> dict[str, Any]:
        self.validate()
        out: dict[str, Any] = {
            "level": int(self.level),
            "object_sparsity": float(self.object_sparsity),
            "vertex_count": int(self.vertex_count),
            "coarsening_method": self.coarsening_method,
            "parent_level": self.parent_level,
            "arrays_present": list(self.arrays_present),
        }
        if self.chunk_shape is not None:
            out["chunk_shape"] = _floats(self.chunk_shape)
        for k in ("fragments_tile", "preserves_object_ids", "inherited_num_objects", "shared_fragments"):
            v = getattr(self, k)
            if v is not None:
                out[k] = v
        out.update(self.extra)
        return {"zarr_vectors_level": out}

    @classmethod
    def from_attrs(cls, attrs: dict) -> LevelMetadata:
        lv = attrs.get("zarr_vectors_level")
        if not isinstance(lv, dict):
            raise MetadataError("level group has no 'zarr_vectors_level' attributes")
        missing = [k for k in ("level", "vertex_count", "arrays_present") if k not in lv]
        if missing:
            raise MetadataError(f"'zarr_vectors_level' lacks required keys {missing}")
        known = {"level", "vertex_count", "arrays_present", "object_sparsity", "coarsening_method",
                 "parent_level", "chunk_shape", "fragments_tile", "preserves_object_ids",
                 "inherited_num_objects", "shared_fragments", "bin_shape", "bin_ratio"}
        return cls(
            level=int(lv["level"]),
            vertex_count=int(lv["vertex_count"]),
            arrays_present=list(lv["arrays_present"]),
            object_sparsity=float(lv.get("object_sparsity", 1.0)),
            coarsening_method=str(lv.get("coarsening_method", "none")),
            parent_level=lv.get("parent_level"),
            chunk_shape=tuple(lv["chunk_shape"]) if lv.get("chunk_shape") else None,
            bin_shape=tuple(lv["bin_shape"]) if lv.get("bin_shape") else None,
            bin_ratio=tuple(lv["bin_ratio"]) if lv.get("bin_ratio") else None,
            fragments_tile=lv.get("fragments_tile"),
            preserves_object_ids=lv.get("preserves_object_ids"),
            inherited_num_objects=lv.get("inherited_num_objects"),
            shared_fragments=lv.get("shared_fragments"),
            extra={k: v for k, v in lv.items() if k not in known},
        )


def multiscales_block(axes: list[dict], base_bin: tuple[float, ...],
                      level_bins: dict[int, tuple[float, ...]]) -> list[dict]:
    """NGFF ``multiscales``: level k gets scale ``bin_k / base_bin`` and translation ``bin_k / 2``."""
    datasets = []
    for level in sorted(level_bins):
        b = level_bins[level]
        datasets.append({
            "path": str(level),
            "coordinateTransformations": [
                {"type": "scale", "scale": [float(x) / float(y) for x, y in zip(b, base_bin)]},
                {"type": "translation", "translation": [float(x) / 2.0 for x in b]},
            ],
        })
    return [{"version": "0.4", "name": "default", "axes": [dict(a) for a in axes], "datasets": datasets,
             "metadata": {"format": "zarr_vectors"}}]


def level_bins_from_multiscales(attrs: dict) -> dict[int, tuple[float, ...]]:
    """``{level: bin_shape}`` read back from the NGFF datasets (2 x translation)."""
    out: dict[int, tuple[float, ...]] = {}
    try:
        datasets = attrs["multiscales"][0]["datasets"]
    except (KeyError, IndexError, TypeError):
        return out
    for ds in datasets:
        try:
            level = int(ds["path"])
        except (KeyError, ValueError):
            continue
        for t in ds.get("coordinateTransformations", []):
            if t.get("type") == "translation":
                out[level] = tuple(2.0 * float(v) for v in t["translation"])
    return out


def store_name(path: str | None) -> str:
    """RFC-8 node name: last path segment without a .zarrvectors / .zv / .zarr suffix."""
    if not path:
        return "zarr_vectors"
    seg = str(path).rstrip("/").split("/")[-1]
    for suffix in (".zarrvectors", ".zv", ".zarr"):
        if seg.endswith(suffix):
            seg = seg[: -len(suffix)]
            break
    return seg or "zarr_vectors"


def ome_block(name: str, axes: list[dict], levels: list[int]) -> dict:
    """RFC-8 ``ome`` collection node; one ``zv:level`` leaf per level group."""
    ax = []
    for a in axes:
        entry = {"name": a["name"], "type": a.get("type", "space")}
        if a.get("unit"):
            entry["unit"] = a["unit"]
        ax.append(entry)
    return {
        "version": "0.6",
        "type": "collection",
        "name": name,
        "attributes": {"scene": {"coordinateSystems": [{"name": "world", "axes": ax}],
                                 "coordinateTransformations": []}},
        "nodes": [{"type": "zv:level", "name": str(k)} for k in sorted(levels)],
    }


def vertices_attrs(dtype: str, nonempty: list[str], origin) -> dict:
    """Attributes of a level's ``vertices`` array: presence list, dtype, encoding, grid origin."""
    out = {"nonempty_chunks": nonempty, "zv_array": "vertices", "dtype": np.dtype(dtype).name, "encoding": "raw"}
    return _with_origin(out, origin)


def fragments_attrs(nonempty: list[str], origin) -> dict:
    """Attributes of a level's ``vertex_fragments`` array: presence list, encoding, grid origin."""
    out = {"nonempty_chunks": nonempty, "zv_array": "vertex_fragments", "encoding": "fragment_index_v1"}
    return _with_origin(out, origin)


def attribute_attrs(name: str, dtype, channels: int | None, nonempty: list[str], origin,
                    unit: str | None = None, description: str | None = None) -> dict:
    """Attributes of one ``vertex_attributes/<name>`` array: dtype, row shape, channel names, presence list."""
    out: dict[str, Any] = {"nonempty_chunks": nonempty, "zv_array": "attribute", "name": name,
                           "dtype": np.dtype(dtype).name}
    if channels is None:
        out["row_shape"] = []
    else:
        out["row_shape"] = [int(channels)]
        out["channel_names"] = [f"ch{i}" for i in range(int(channels))]
    if unit:
        out["unit"] = unit
    if description:
        out["description"] = description
    return _with_origin(out, origin)


def _with_origin(out: dict, origin) -> dict:
    if origin is not None and any(int(o) != 0 for o in origin):
        out["chunk_grid_origin"] = [int(o) for o in origin]
    return out


def attribute_spec(dtype, channels: int | None, unit=None, description=None, categorical=False) -> dict:
    """One entry of ``attribute_specs["vertex"]``; defaults omitted as the format wants."""
    out: dict[str, Any] = {"dtype": np.dtype(dtype).name}
    if channels is not None and channels != 1:
        out["channels"] = int(channels)
    if categorical:
        out["categorical"] = True
    if unit:
        out["unit"] = unit
    if description:
        out["description"] = description
    return out
