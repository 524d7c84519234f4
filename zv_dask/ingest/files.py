"""CSV and Parquet files read partition by partition by zv-dask itself, so that a bad file is named.

dask's ``read_csv`` / ``read_parquet`` raise, from a worker, errors that name
neither the file nor the place (``Mismatched dtypes found in pd.read_csv``, a
thrift error of a corrupt page). Here a partition is ``(file, where in it)``:
a CSV block of bytes, a run of Parquet row groups. Whatever goes wrong while
reading one becomes an :class:`~zv_dask.errors.InputError` naming the file, the
line (CSV) or rows and row groups (Parquet), and the cause.

CSV blocks end on line boundaries (a block starts after the first newline at or
after its offset, as dask's blocks do); each block is parsed with the file's
header. Column types come from a sample of the first file with rows; a block
whose column holds text where the sample had numbers names the line and the
value.
"""

from __future__ import annotations

import io
import re
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from zv_dask.errors import InputError
from zv_dask.ingest.batch import Batch

__all__ = ["Part", "csv_sample", "csv_parts", "parquet_parts", "read_part", "describe_row", "first_text_value"]

CSV_BLOCK = 64 * 2 ** 20  # bytes per CSV partition (dask's read_csv used the same)
CSV_SAMPLE = 256 * 2 ** 10  # bytes of the first file that decide the column types
_SEEK = 1 << 16


@dataclass(frozen=True)
class Part:
    """Where one partition's rows are: a CSV byte range, or Parquet row groups."""

    path: str
    kind: str  # "csv" | "parquet" (read here); "npy" | "las" (only located: ``first_row``)
    offset: int = 0  # csv: bytes
    length: int = 0  # csv: bytes; parquet: rows
    first_row: int = 0  # parquet: the partition's first row in the file
    row_groups: tuple = ()


# -- files -------------------------------------------------------------------------------------
def _open(path: str):
    import fsspec

    return fsspec.open(path, "rb").open()


def _size(path: str) -> int:
    import fsspec

    fs, p = fsspec.core.url_to_fs(path)
    return int(fs.size(p))


def _after_newline(f, pos: int) -> int:
    """The position just after the first newline at or after ``pos`` (the file's end if none)."""
    f.seek(pos)
    while True:
        piece = f.read(_SEEK)
        if not piece:
            return f.tell()
        i = piece.find(b"\n")
        if i >= 0:
            return pos + i + 1
        pos += len(piece)


def _block(f, offset: int, length: int) -> tuple[int, bytes]:
    """``(start, bytes)`` of the lines that begin in ``[offset, offset + length)`` (blocks tile the file)."""
    start = 0 if offset == 0 else _after_newline(f, offset - 1)
    end = _after_newline(f, offset + length - 1)
    if end <= start:
        return start, b""
    f.seek(start)
    return start, f.read(end - start)


def _header(f) -> bytes:
    f.seek(0)
    end = _after_newline(f, 0)
    f.seek(0)
    return f.read(end)


def _lines_before(f, pos: int) -> int:
    """Newlines in the file before ``pos``."""
    f.seek(0)
    n, left = 0, pos
    while left > 0:
        piece = f.read(min(left, 1 << 24))
        if not piece:
            break
        n += piece.count(b"\n")
        left -= len(piece)
    return n


def _data_lines(block: bytes, header_inside: bool) -> list[int]:
    """0-based line numbers (within the block) of its data rows, as pandas counts them (blank lines skipped)."""
    out = []
    for i, line in enumerate(block.split(b"\n")):
        if header_inside and i == 0:
            continue
        if line.strip():
            out.append(i)
    return out


def _read_csv(data: bytes, what: str, usecols=None):
    import pandas as pd

    try:
        return pd.read_csv(io.BytesIO(data), usecols=usecols)
    except pd.errors.EmptyDataError:
        raise InputError(f"{what} is empty: no header and no rows") from None


# -- CSV ---------------------------------------------------------------------------------------
def csv_sample(files: list[str]):
    """The first rows of the first file that has rows (they decide the column types); checks every header.

    Reads :data:`CSV_SAMPLE` bytes of the files up to the first with a row, and
    only the header line of the others. Raises :class:`InputError` naming an
    empty file, a file whose header differs from the first one's, or, when no
    file has a row, every file.
    """
    import pandas as pd

    sample, columns = None, None
    for path in files:
        f = _open(path)
        try:
            head = _block(f, 0, CSV_SAMPLE)[1] if sample is None else _header(f)
        finally:
            f.close()
        if not head.strip():
            raise InputError(f"{path!r} is empty: no header and no rows")
        try:
            frame = _read_csv(head, repr(path))
        except InputError:
            raise
        except pd.errors.ParserError as e:
            raise InputError(f"{path!r}: {_parser_message(e, 0, True)}") from None
        except Exception as e:  # noqa: BLE001 - name the file
            raise InputError(f"cannot read {path!r} as CSV: {type(e).__name__}: {_first_line(e)}") from None
        if columns is None:
            columns = list(frame.columns)
        elif list(frame.columns) != columns:
            raise InputError(f"{path!r} has the columns {list(frame.columns)}, but {files[0]!r} has {columns}; "
                             "ingest files with one header together")
        if sample is None and len(frame):
            sample = (path, frame)
    if sample is None:
        names = files[0] if len(files) == 1 else files
        raise InputError(f"{names!r} hold{'s' if len(files) == 1 else ''} no rows (a header only): no points "
                         f"to ingest (the header: {','.join(map(str, columns or []))})")
    return sample


def csv_parts(files: list[str], block: int | None = None) -> list[Part]:
    """The CSV partitions: blocks of about ``block`` bytes (default :data:`CSV_BLOCK`) of every file, in order."""
    block = int(block or CSV_BLOCK)
    out = []
    for path in files:
        size = _size(path)
        for offset in range(0, max(size, 1), block):
            out.append(Part(path, "csv", offset, min(block, size - offset) if size else 0))
    return out


def first_text_value(path: str, column: str, data: bytes | None = None, header_inside: bool = True,
                     start: int = 0):
    """``(line, value)`` of the first value of ``column`` that is not a number (in a block, or the sample)."""
    import pandas as pd

    if data is None:
        f = _open(path)
        try:
            start, data = _block(f, 0, CSV_SAMPLE)
        finally:
            f.close()
        header_inside = True
    frame = _read_csv(data if header_inside else _header_of(path) + data, repr(path), usecols=[column])
    col = frame[column]
    bad = pd.to_numeric(col, errors="coerce").isna().to_numpy() & col.notna().to_numpy()
    if not bad.any():
        return None, None
    row = int(np.argmax(bad))
    return _line_of(path, start, data, header_inside, row), col.iloc[row]


def _header_of(path: str) -> bytes:
    f = _open(path)
    try:
        return _header(f)
    finally:
        f.close()


def _line_of(path: str, start: int, data: bytes, header_inside: bool, row: int) -> int:
    """The 1-based line of the file where data row ``row`` of the block at ``start`` is."""
    lines = _data_lines(data, header_inside)
    if row >= len(lines):
        return 0
    f = _open(path)
    try:
        before = _lines_before(f, start) if start else 0
    finally:
        f.close()
    return before + lines[row] + 1


def _first_line(e: BaseException) -> str:
    return (str(e).strip().splitlines() or [type(e).__name__])[0]


def _parser_message(e: Exception, lines_before: int, header_inside: bool) -> str:
    """pandas' tokenizer error with the line counted in the file rather than in the block."""
    text = _first_line(e)
    m = re.search(r"Expected (\d+) fields in line (\d+), saw (\d+)", text)
    if not m:
        return f"cannot parse it as CSV: {text}"
    line = int(m.group(2))
    line = lines_before + (line if header_inside else line - 1)
    return f"line {line} has {m.group(3)} fields, the header {m.group(1)}"


def _read_csv_part(part: Part, needed: list[str]):
    """The block's rows of the ``needed`` columns, as pandas infers their types; ``(frame, locate)``."""
    import pandas as pd

    f = _open(part.path)
    try:
        start, data = _block(f, part.offset, part.length) if part.length else (0, b"")
        header_inside = start == 0
        text = data if header_inside else _header(f) + data
        if not data.strip():
            return None, None
        try:
            # every column, not usecols: with usecols pandas takes a line of too many fields without a word
            frame = pd.read_csv(io.BytesIO(text))
        except pd.errors.ParserError as e:
            raise InputError(f"{part.path!r}: {_parser_message(e, _lines_before(f, start), header_inside)}") from None
        except Exception as e:  # noqa: BLE001 - bytes that are not text, and the like: name the file and where
            raise InputError(f"cannot read {part.path!r} as CSV in bytes {start}..{start + len(data) - 1} "
                             f"(from line {_lines_before(f, start) + 1}): {type(e).__name__}: {_first_line(e)}") \
                from None
    finally:
        f.close()
    missing = [c for c in needed if c not in frame.columns]
    if missing:
        header = _header_of(part.path).decode(errors="replace").strip()
        raise InputError(f"{part.path!r} has no column(s) {missing}; its header is {header!r}")

    def locate(row: int) -> str:
        return f"line {_line_of(part.path, start, data, header_inside, row)}"

    def text_value(column: str):
        return first_text_value(part.path, column, data, header_inside, start)

    return frame, (locate, text_value)


# -- Parquet -----------------------------------------------------------------------------------
def parquet_parts(files: list[str], rows: int, footers: dict | None = None) -> list[Part]:
    """Runs of whole row groups of about ``rows`` rows (at least one group each), file by file.

    ``footers``: the files' metadata, where already read (else read here).
    """
    import pyarrow.parquet as pq

    out = []
    for path in files:
        md = (footers or {}).get(path) or pq.read_metadata(path)
        groups: list[int] = []
        first, n = 0, 0
        for g in range(md.num_row_groups):
            k = md.row_group(g).num_rows
            if groups and n + k > rows:
                out.append(Part(path, "parquet", length=n, first_row=first, row_groups=tuple(groups)))
                groups, first, n = [], first + n, 0
            groups.append(g)
            n += k
        if groups or not out or out[-1].path != path:
            out.append(Part(path, "parquet", length=n, first_row=first, row_groups=tuple(groups)))
    return out


def _bad_row_group(part: Part, needed: list[str]) -> str:
    """``in row group 3 (rows 30000..39999)``: the first of the partition's row groups that fails alone."""
    import pyarrow.parquet as pq

    first = part.first_row
    try:
        with pq.ParquetFile(part.path) as pf:
            for g in part.row_groups:
                n = pf.metadata.row_group(g).num_rows
                try:
                    pf.read_row_group(g, columns=needed).to_pandas()
                except Exception:  # noqa: BLE001 - this is the one
                    return f"in row group {g} (rows {first}..{first + n - 1})"
                first += n
    except Exception:  # noqa: BLE001 - only a better message
        pass
    return f"in rows {part.first_row}..{part.first_row + part.length - 1}"


def _read_parquet_part(part: Part, needed: list[str]):
    import pyarrow.parquet as pq

    try:
        with pq.ParquetFile(part.path) as pf:
            frame = pf.read_row_groups(list(part.row_groups), columns=needed).to_pandas()
    except KeyError as e:
        raise InputError(f"{part.path!r} has no column {e}") from None
    except Exception as e:  # noqa: BLE001 - corrupt pages, bad encodings, I/O: name the file and where
        raise InputError(f"{part.path!r} is corrupt or unreadable {_bad_row_group(part, needed)}: "
                         f"{type(e).__name__}: {_first_line(e)}") from None
    missing = [c for c in needed if c not in frame.columns]
    if missing:
        raise InputError(f"{part.path!r} has no column(s) {missing}")

    def locate(row: int) -> str:
        return f"row {part.first_row + row}"

    return frame, (locate, None)


# -- a partition -------------------------------------------------------------------------------
def read_part(part: Part, columns: list[str], attr_names: list[str], oid_col: str | None, dtypes: dict):
    """One partition as a :class:`~zv_dask.ingest.batch.Batch` (runs on a worker).

    ``dtypes`` are the columns' types as the input declared them (the Parquet
    schema, the CSV sample): attributes are stored as those, so a block that
    does not fit them is an error naming the line or row.
    """
    needed = list(dict.fromkeys([*columns, *attr_names] + ([oid_col] if oid_col else [])))
    frame = None
    locate: Callable[[int], str] | None = None
    text_value: Callable | None = None
    if part.kind == "parquet":
        frame, (locate, text_value) = _read_parquet_part(part, needed)
    elif part.length:
        frame, found = _read_csv_part(part, needed)
        if frame is not None:
            locate, text_value = found
    if frame is None or not len(frame):
        pos = np.zeros((0, len(columns)), np.result_type(*[np.dtype(dtypes[c]) for c in columns]))
        return Batch(pos, {a: np.zeros(0, dtypes[a]) for a in attr_names},
                     np.zeros(0, np.int64) if oid_col else None)
    assert locate is not None, "a block read comes with its locate()"
    where = f"{part.path!r}"

    def values(c: str, role: str) -> np.ndarray:
        col = frame[c]
        want = np.dtype(dtypes[c])
        try:
            kind = np.dtype(col.dtype).kind
        except TypeError:
            kind = "O"
        if kind not in "biuf":
            line, value = text_value(c) if text_value is not None else (None, None)
            at = f" at line {line} ({value!r})" if line else ""
            raise InputError(f"{where}: {role} column {c!r} holds text where numbers belong{at}"
                             + ("" if at else f" (its values here have dtype {col.dtype})"))
        v = col.to_numpy()
        if role == "coordinate":
            return v
        if want.kind in "iub" and kind == "f":  # the first rows said integers; here an empty field or a fraction
            bad = ~np.isfinite(v) | (v != np.round(v)) if want.kind != "b" else ~np.isin(v, (0, 1))
            if bad.any():
                row = int(np.argmax(bad))
                empty = bool(np.isnan(v[row]))
                what = "is empty" if empty else f"holds {float(v[row]):g}"
                raise InputError(f"{where}: {role} column {c!r} {what} at {locate(row)}, but the input declares "
                                 f"it {want.name} ("
                                 + ("its first rows are integers" if part.kind == "csv" else "its schema") + "): "
                                 + ("fill the empty values, or write" if empty else "write")
                                 + " the column as floats (1.0, not 1)")
        return v.astype(want, copy=False)

    pos = np.column_stack([values(c, "coordinate") for c in columns])
    attrs = {a: values(a, "attribute") for a in attr_names}
    oids = values(oid_col, "object id") if oid_col else None
    return Batch(pos, attrs, oids)


def describe_row(part: Part, row: int) -> str:
    """Where row ``row`` of the partition ``part`` is, for a message: ``line 12 of 'f.csv'`` (client side)."""
    if part.kind != "csv":  # parquet, npy, las: rows (points) counted from 0 in the file
        return f"row {part.first_row + row} of {part.path!r}"
    try:
        f = _open(part.path)
        try:
            start, data = _block(f, part.offset, part.length)
        finally:
            f.close()
        return f"line {_line_of(part.path, start, data, start == 0, row)} of {part.path!r}"
    except Exception:  # noqa: BLE001 - only a better message
        return f"data row {row} of the block at byte {part.offset} of {part.path!r}"
