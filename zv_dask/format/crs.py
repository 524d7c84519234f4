"""The root ``crs``: what users and LAS headers give, normalised to the dict the store keeps, and put in words.

The format keeps ``crs`` as an opaque dict; zv-dask writes ``{"epsg": code}`` (optionally with
``"vertical_epsg"``), ``{"wkt": text}`` or ``{"projjson": {...}}``.
"""

from __future__ import annotations

import json

import numpy as np

from zv_dask.errors import InputError

__all__ = ["crs_label", "normalize_crs", "crs_text", "pyproj_crs"]


def crs_label(crs) -> str:
    """A CRS in a few words: ``EPSG:32633``, the name in a WKT or PROJJSON, else its JSON cut short."""
    if not crs:
        return "no CRS"
    if not isinstance(crs, dict):
        return str(crs)[:80]
    if "epsg" in crs:
        return f"EPSG:{crs['epsg']}" + (f"+{crs['vertical_epsg']}" if crs.get("vertical_epsg") else "")
    if isinstance(crs.get("wkt"), str):
        wkt = crs["wkt"]
        start = wkt.find('"')
        return f"WKT {wkt[start + 1:wkt.find(chr(34), start + 1)] if start >= 0 else wkt[:40]!r}"
    pj = crs.get("projjson", crs)
    if isinstance(pj, dict) and "name" in pj:
        ident = pj.get("id") or {}
        code = f" ({ident.get('authority')}:{ident.get('code')})" if ident.get("code") is not None else ""
        return f"{pj['name']}{code}"
    text = json.dumps(crs, sort_keys=True, default=str)
    return text if len(text) <= 80 else text[:77] + "..."


def normalize_crs(value) -> dict | None:
    """A user's CRS (``"EPSG:32610"``, an EPSG number, WKT, PROJJSON text or dict, a pyproj CRS) as the root ``crs``."""
    if value is None or isinstance(value, dict):
        return value
    if hasattr(value, "to_wkt"):  # a pyproj CRS
        return {"wkt": value.to_wkt()}
    if isinstance(value, (int, np.integer)) and not isinstance(value, bool):
        return {"epsg": int(value)}
    if isinstance(value, str):
        text = value.strip()
        if text.upper().startswith("EPSG:") and text[5:].isdigit():
            return {"epsg": int(text[5:])}
        if text.startswith("{"):
            try:
                return {"projjson": json.loads(text)}
            except ValueError:
                pass
        if "[" in text:
            return {"wkt": text}
    raise InputError(f"crs {value!r} is not a CRS zv-dask understands: give 'EPSG:<code>', WKT, PROJJSON or a dict")


def crs_text(crs: dict) -> str:
    """A root ``crs`` as the text pyproj takes: ``EPSG:code`` (``+vertical``), the WKT, or PROJJSON."""
    if "epsg" in crs:
        return f"EPSG:{crs['epsg']}" + (f"+{crs['vertical_epsg']}" if crs.get("vertical_epsg") else "")
    if isinstance(crs.get("wkt"), str):
        return crs["wkt"]
    return json.dumps(crs.get("projjson", crs))


def pyproj_crs(crs: dict, what: str = "crs"):
    """The ``pyproj.CRS`` of a root ``crs``; an :class:`InputError` naming ``what`` if pyproj does not know it."""
    try:
        import pyproj
    except ImportError as e:
        raise InputError(f"{what} needs pyproj: pip install 'zv-dask[crs]'") from e
    try:
        return pyproj.CRS.from_user_input(crs_text(crs))
    except pyproj.exceptions.CRSError as e:
        raise InputError(f"{what} {crs_label(crs)} is not a CRS pyproj knows: {e}") from None
