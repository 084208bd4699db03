"""The audit trail of reconstructions, as a hash chain over the `audit` table's rows.

Each row carries `chain_index` (0, 1, 2, ...), `prev_hash` (the previous row's hash; 64
zeros for the first) and `row_hash` = SHA-256 over `prev_hash` and the row's own fields,
canonically encoded by their schema types. Altering a row breaks its own hash; removing or
inserting one breaks the next row's `prev_hash`; `verify_audit_chain` names the first row
where the chain breaks. Appends take an exclusive file lock, so concurrent reconstruct
tasks and runs on one catalog extend one chain. The chain shows tampering; it does not
prevent it: a writer with access to the whole table can rebuild it from the point it
edits, so keep a copy of the latest `row_hash` (the run log prints it) elsewhere.
"""
from __future__ import annotations

import fcntl
import hashlib
import json
import math
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from typing import Any

import pandas as pd
import pyarrow as pa

from catalogs.schemas import AUDIT
from catalogs.store import CatalogStore

GENESIS = "0" * 64
_CHAIN_FIELDS = ("chain_index", "prev_hash", "row_hash")
_LOCK_NAME = ".chain.lock"


def _is_null(value: Any) -> bool:
    return value is None or value is pd.NA or (isinstance(value, float) and math.isnan(value))


def _canonical_value(field: pa.Field, value: Any) -> Any:
    """The same value whether it comes from a Python row or from a Parquet read through pandas."""
    if _is_null(value):
        return None
    if pa.types.is_integer(field.type):
        return int(value)
    if pa.types.is_floating(field.type):
        return repr(float(value))  # repr round-trips exactly, inf included
    if pa.types.is_timestamp(field.type):
        return pd.Timestamp(value).tz_convert("UTC").isoformat()
    if pa.types.is_boolean(field.type):
        return bool(value)
    return str(value)


def row_hash(row: Mapping[str, Any]) -> str:
    """SHA-256 of the row's `prev_hash` and every schema field but the hash itself."""
    canonical = {f.name: _canonical_value(f, row.get(f.name)) for f in AUDIT if f.name != "row_hash"}
    return hashlib.sha256(json.dumps(canonical, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


@contextmanager
def _chain_lock(store: CatalogStore) -> Iterator[None]:
    directory = store.table_dir("audit")
    directory.mkdir(parents=True, exist_ok=True)
    with open(directory / _LOCK_NAME, "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _chain(store: CatalogStore) -> pd.DataFrame:
    return store.read("audit").sort_values("chain_index", kind="stable").reset_index(drop=True)


def append_audit_row(store: CatalogStore, row: Mapping[str, Any]) -> dict[str, Any]:
    """Append `row` (every AUDIT field but the chain's) as the chain's next link; returns it complete."""
    with _chain_lock(store):
        chain = _chain(store)
        if len(chain):
            last = chain.iloc[-1]
            index, prev = int(last["chain_index"]) + 1, str(last["row_hash"])
        else:
            index, prev = 0, GENESIS
        linked = {**{k: v for k, v in row.items() if k not in _CHAIN_FIELDS}, "chain_index": index, "prev_hash": prev}
        linked["row_hash"] = row_hash(linked)
        store.write_part("audit", str(row["run_id"]), f"chain-{index:010d}", [linked])
    return linked


def verify_audit_chain(store: CatalogStore) -> str | None:
    """None when the chain is intact, else a sentence naming the first row where it breaks."""
    chain = _chain(store)
    prev = GENESIS
    for position, record in enumerate(chain.to_dict("records")):
        where = f"audit row {position} (chain_index {record['chain_index']}, video {record['video_id']}, " \
                f"run {record['run_id']})"
        if _is_null(record["chain_index"]) or int(record["chain_index"]) != position:
            return f"{where}: chain index out of order (a row was removed or inserted before it)"
        if record["prev_hash"] != prev:
            return f"{where}: its prev_hash does not match the row before it (a row was removed or replaced)"
        if row_hash(record) != record["row_hash"]:
            return f"{where}: its content does not match its hash (the row was altered)"
        prev = record["row_hash"]
    return None

