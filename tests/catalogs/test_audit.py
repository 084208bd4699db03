"""The audit trail's hash chain: intact when appended to, and the first broken row named when tampered with."""
from __future__ import annotations

import threading
from datetime import datetime, timedelta, timezone

import pyarrow.parquet as pq

from catalogs import CatalogStore
from catalogs.audit import GENESIS, append_audit_row, row_hash, verify_audit_chain

T0 = datetime(2026, 12, 1, 12, 0, tzinfo=timezone.utc)


def audit_row(i: int, run_id: str = "run-1") -> dict:
    return dict(run_id=run_id, video_id=f"{i:064x}", public_path=f"/public/{i}.mkv", output_path=f"/out/{i}.mkv",
                key_fingerprint="0123456789abcdef", restore_path="sealed", seal="high", status="done", error=None,
                frames=24, frames_with_payload=0, frames_payload_invalid=0, rois_restored=24 + i, chunks_total=2,
                chunks_failed=0, psnr_roi=44.25 if i % 2 else float("inf"), operator="officer", host="vault",
                started_at=T0 + timedelta(seconds=i), finished_at=T0 + timedelta(seconds=i + 1), seconds_total=1.0)


def chained(tmp_path, n: int = 4) -> CatalogStore:
    store = CatalogStore(tmp_path / "catalogs")
    for i in range(n):
        append_audit_row(store, audit_row(i))
    return store


def test_rows_link_to_the_one_before_and_verify(tmp_path):
    store = chained(tmp_path)
    rows = store.read("audit").sort_values("chain_index").to_dict("records")
    assert [r["chain_index"] for r in rows] == [0, 1, 2, 3]
    assert rows[0]["prev_hash"] == GENESIS
    assert all(rows[i]["prev_hash"] == rows[i - 1]["row_hash"] for i in range(1, 4))
    assert all(row_hash(r) == r["row_hash"] for r in rows), "the hash survives the Parquet round trip"
    assert verify_audit_chain(store) is None


def _rewrite(path, column: str, value) -> None:
    table = pq.read_table(path)
    index = table.schema.get_field_index(column)
    pq.write_table(table.set_column(index, table.schema.field(index), [[value]]), path)


def test_an_altered_row_is_named(tmp_path):
    store = chained(tmp_path)
    (part,) = store.table_dir("audit").glob("*chain-0000000002.parquet")
    _rewrite(part, "key_fingerprint", "fedcba9876543210")  # someone hides which key restored it
    assert verify_audit_chain(store).startswith("audit row 2 (chain_index 2")
    assert "altered" in verify_audit_chain(store)


def test_a_removed_row_breaks_the_chain_at_the_next_one(tmp_path):
    store = chained(tmp_path)
    (part,) = store.table_dir("audit").glob("*chain-0000000001.parquet")
    part.unlink()
    problem = verify_audit_chain(store)
    assert problem.startswith("audit row 1 (chain_index 2") and "removed or inserted" in problem


def test_a_rehashed_forgery_still_breaks_the_link_after_it(tmp_path):
    store = chained(tmp_path)
    (part,) = store.table_dir("audit").glob("*chain-0000000001.parquet")
    row = store.read("audit").sort_values("chain_index").to_dict("records")[1]
    forged = {**row, "operator": "nobody"}
    _rewrite(part, "operator", "nobody")
    _rewrite(part, "row_hash", row_hash(forged))  # consistent on its own ...
    problem = verify_audit_chain(store)
    assert problem.startswith("audit row 2") and "prev_hash" in problem  # ... but not with its successor


def test_concurrent_appends_extend_one_chain(tmp_path):
    store = CatalogStore(tmp_path / "catalogs")
    threads = [threading.Thread(target=append_audit_row, args=(store, audit_row(i, f"run-{i}"))) for i in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(store.read("audit")["chain_index"]) == list(range(6))
    assert verify_audit_chain(store) is None
