"""Append-only Parquet catalogs: one file per (run, part), atomic writes, schema-first reads.

Layout: `<root>/<table>/<run_id>__<part>.parquet`. A part is usually a video id
or "summary". Because a file belongs to exactly one (run, part), a retried
Prefect task rewrites only its own file, so retries never duplicate rows.
"""

from __future__ import annotations

import hashlib
import numbers
import os
import re
import secrets
import tempfile
from collections.abc import Mapping, Sequence
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import pandas as pd
import pyarrow as pa
import pyarrow.dataset as ds
import pyarrow.parquet as pq

from catalogs.schemas import SCHEMAS, VIDEO_SUCCESS_STATUSES

_UNSAFE_CHARS = re.compile(r"[^A-Za-z0-9._-]")
_MAX_NAME_CHARS = 100

# Plain numpy ints turn nulls into NaN floats; nullable dtypes keep pixel boxes integers.
_PANDAS_TYPES = {
    pa.int32(): pd.Int32Dtype(),
    pa.int64(): pd.Int64Dtype(),
    pa.bool_(): pd.BooleanDtype(),
}


def utc_now() -> datetime:
    """The time every catalog timestamp is given in: timezone-aware UTC (naive times are refused)."""
    return datetime.now(timezone.utc)


def new_run_id() -> str:
    """A UTC timestamp plus a random suffix: sorts by start time, safe as a file name."""
    now = datetime.now(timezone.utc)
    return f"{now:%Y%m%dT%H%M%S}{now.microsecond // 1000:03d}Z-{secrets.token_hex(3)}"


def file_content_hash(path: str | Path, chunk_size: int = 1 << 20) -> str:
    """SHA-256 hex digest of a file's bytes, read in chunks so memory stays bounded."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(chunk_size), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _safe_name(text: str) -> str:
    """Make `text` a file name component; distinct inputs stay distinct.

    Replaced characters get a hash suffix, otherwise "a/b" and "a_b" would share
    one file and silently overwrite each other. A leading "." or "_" is replaced
    too, because dataset discovery skips such files.
    """
    safe = _UNSAFE_CHARS.sub("_", text)
    if safe[:1] in ("", ".", "_"):
        safe = "x" + safe
    if safe != text or len(safe) > _MAX_NAME_CHARS:
        tag = hashlib.sha256(text.encode("utf-8")).hexdigest()[:10]
        safe = f"{safe[:_MAX_NAME_CHARS]}-{tag}"
    return safe


def _is_missing(value: Any) -> bool:
    return value is None or value is pd.NA


def _check_values(field: pa.Field, values: list[Any]) -> None:
    """Reject values pyarrow would accept silently but wrongly."""
    for index, value in enumerate(values):
        if _is_missing(value):
            continue
        if pa.types.is_integer(field.type) and isinstance(value, numbers.Real) \
                and not isinstance(value, numbers.Integral) and not float(value).is_integer():
            # pyarrow truncates 1.5 to 1; a box must never move by a pixel unnoticed.
            raise ValueError(f"column {field.name!r} row {index}: {value!r} is not an integer")
        if pa.types.is_timestamp(field.type) and isinstance(value, datetime) \
                and value.utcoffset() is None:
            # pyarrow would read a naive (usually local) time as UTC, off by hours.
            raise ValueError(f"column {field.name!r} row {index}: naive datetime, give a timezone")


def rows_to_table(table: str, rows: Sequence[Mapping[str, Any]]) -> pa.Table:
    """Validate rows against the table's schema and build a pyarrow table."""
    schema = _schema(table)
    for index, row in enumerate(rows):
        unknown = sorted(set(row) - set(schema.names))
        if unknown:
            raise ValueError(f"{table}: unknown column(s) {unknown} in row {index}")
    arrays = []
    for field in schema:
        values = [None if _is_missing(row.get(field.name)) else row.get(field.name) for row in rows]
        if not field.nullable:
            missing = [index for index, value in enumerate(values) if value is None]
            if missing:
                raise ValueError(
                    f"{table}: required column {field.name!r} is missing or null in row {missing[0]}")
        _check_values(field, values)
        try:
            arrays.append(pa.array(values, type=field.type))
        except (pa.ArrowInvalid, pa.ArrowTypeError, OverflowError) as exc:
            raise ValueError(f"{table}: column {field.name!r}: {exc}") from exc
    return pa.Table.from_arrays(arrays, schema=schema)


def _schema(table: str) -> pa.Schema:
    try:
        return SCHEMAS[table]
    except KeyError:
        raise ValueError(f"unknown table {table!r}; known: {sorted(SCHEMAS)}") from None


class CatalogStore:
    """The catalog tables under one root directory, one subdirectory per table."""

    def __init__(self, root: str | Path) -> None:
        self.root = Path(root)

    def table_dir(self, table: str) -> Path:
        _schema(table)
        return self.root / table

    def part_path(self, table: str, run_id: str, part: str) -> Path:
        return self.table_dir(table) / f"{_safe_name(run_id)}__{_safe_name(part)}.parquet"

    def write_part(self, table: str, run_id: str, part: str,
                   rows: Sequence[Mapping[str, Any]]) -> Path | None:
        """Write `rows` as the file of (run_id, part), replacing any earlier copy.

        Returns the file written, or None for zero rows (nothing is written).
        """
        data = rows_to_table(table, rows)
        wrong_run = [row["run_id"] for row in rows if row["run_id"] != run_id]
        if wrong_run:
            # The file is named by run_id; a row of another run would be lost on its retry.
            raise ValueError(f"{table}: row run_id {wrong_run[0]!r} differs from part run_id {run_id!r}")
        if data.num_rows == 0:
            return None
        path = self.part_path(table, run_id, part)
        path.parent.mkdir(parents=True, exist_ok=True)
        # Write beside the target then rename: readers see the old file or the new
        # one, never half of one. The "." prefix hides the temp file from readers.
        fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.partial.", dir=path.parent)
        try:
            with os.fdopen(fd, "wb") as handle:
                pq.write_table(data, handle)
                handle.flush()
                os.fsync(handle.fileno())  # content on disk before the name points at it
            os.replace(tmp_name, path)
        except BaseException:
            Path(tmp_name).unlink(missing_ok=True)
            raise
        return path

    def remove_parts(self, table: str, run_id: str, part_prefix: str) -> list[Path]:
        """Delete the files of `run_id` whose part name starts with `part_prefix`; returns them."""
        directory = self.table_dir(table)
        if not directory.is_dir():
            return []
        removed = sorted(directory.glob(f"{_safe_name(run_id)}__{_safe_name(part_prefix)}*.parquet"))
        for path in removed:
            path.unlink(missing_ok=True)
        return removed

    def read(self, table: str, filters: list[tuple] | None = None,
             columns: list[str] | None = None) -> pd.DataFrame:
        """All rows of a table (optionally filtered), typed by the current schema.

        `filters` use pyarrow's DNF form, e.g. [("video_id", "==", vid)].
        Integer and boolean columns come back as pandas nullable dtypes.
        """
        schema = _schema(table)
        directory = self.table_dir(table)
        if directory.is_dir():
            # schema= makes columns absent from older files read as null.
            dataset = ds.dataset(directory, schema=schema, format="parquet")
            expression = pq.filters_to_expression(filters) if filters else None
            data = dataset.to_table(columns=columns, filter=expression)
        else:
            data = schema.empty_table()
            if columns is not None:
                data = data.select(columns)
        return data.to_pandas(types_mapper=_PANDAS_TYPES.get)

    def latest_video_status(self) -> dict[str, str]:
        """video_id -> status of its most recent row (by finished_at, then run_id)."""
        videos = self.read("videos", columns=["video_id", "status", "finished_at", "run_id"])
        latest = (videos.sort_values(["finished_at", "run_id"], kind="stable")
                  .drop_duplicates("video_id", keep="last"))
        return {str(vid): str(status) for vid, status in zip(latest["video_id"], latest["status"])}

    def completed_video_ids(self) -> set[str]:
        """Videos an incremental run may skip: their latest status is a success."""
        return {vid for vid, status in self.latest_video_status().items()
                if status in VIDEO_SUCCESS_STATUSES}
