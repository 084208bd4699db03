"""Catalog store: schema round trips, retry idempotence, schema evolution, atomic writes."""

from __future__ import annotations

import ast
import hashlib
import sys
from datetime import datetime, timedelta, timezone
from pathlib import Path

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

import catalogs.store

from catalogs import SCHEMAS, CatalogStore, file_content_hash, new_run_id

T0 = datetime(2024, 5, 1, 12, 0, tzinfo=timezone.utc)


def sample_value(field: pa.Field, seed: int):
    """A distinct, exactly representable value of the field's type."""
    t = field.type
    if pa.types.is_string(t):
        return f"{field.name}-{seed}"
    if pa.types.is_boolean(t):
        return seed % 2 == 0
    if pa.types.is_int64(t):
        return 2**40 + seed  # beyond int32: proves the column really is 64-bit
    if pa.types.is_integer(t):
        return 1000 + seed
    if pa.types.is_floating(t):
        return 0.25 + seed  # exact in float32 too
    if pa.types.is_timestamp(t):
        return T0 + timedelta(microseconds=seed)
    raise AssertionError(f"no sample for {t}")


def sample_row(table: str, run_id: str, seed: int = 0, nulls: bool = False) -> dict:
    row = {f.name: None if (nulls and f.nullable) else sample_value(f, seed + i)
           for i, f in enumerate(SCHEMAS[table])}
    row["run_id"] = run_id
    return row


def video_row(run_id: str, video_id: str, status: str, finished: datetime) -> dict:
    row = sample_row("videos", run_id)
    row.update(video_id=video_id, status=status, started_at=finished, finished_at=finished)
    return row


@pytest.fixture
def store(tmp_path: Path) -> CatalogStore:
    return CatalogStore(tmp_path / "catalog")


@pytest.mark.parametrize("table", sorted(SCHEMAS))
def test_round_trip_every_table(store: CatalogStore, table: str) -> None:
    full, sparse = sample_row(table, "r1", seed=0), sample_row(table, "r1", seed=100, nulls=True)
    store.write_part(table, "r1", "p", [full, sparse])
    df = store.read(table)
    assert list(df.columns) == SCHEMAS[table].names
    got = df.to_dict("records")
    for field in SCHEMAS[table]:
        assert got[0][field.name] == full[field.name], field.name
        if field.nullable:
            assert pd.isna(got[1][field.name]), field.name
    on_disk = pq.read_schema(store.part_path(table, "r1", "p"))
    assert on_disk.equals(SCHEMAS[table])


def test_schema_conventions() -> None:
    assert sorted(SCHEMAS) == ["audit", "faces", "metrics", "rois", "runs", "sequences", "videos"]
    for name, schema in SCHEMAS.items():
        assert not schema.field("run_id").nullable, name
        for field in schema:
            if pa.types.is_timestamp(field.type):
                assert field.type == pa.timestamp("us", tz="UTC"), (name, field.name)
    rois = SCHEMAS["rois"]
    assert all(rois.field(c).type == pa.int32() for c in ("frame_index", "x", "y", "w", "h"))
    assert rois.field("score").nullable and rois.field("score").type == pa.float32()
    assert SCHEMAS["videos"].field("faces").type == pa.int64()


def test_rewriting_same_part_keeps_one_copy(store: CatalogStore) -> None:
    first = [sample_row("rois", "r1", seed=s) for s in range(3)]
    store.write_part("rois", "r1", "vid", first)
    retried = [sample_row("rois", "r1", seed=s) for s in range(10, 12)]
    store.write_part("rois", "r1", "vid", retried)
    df = store.read("rois")
    assert sorted(df["x"]) == sorted(r["x"] for r in retried)


def test_runs_and_parts_append(store: CatalogStore) -> None:
    store.write_part("rois", "r1", "a", [sample_row("rois", "r1", seed=1)])
    store.write_part("rois", "r1", "b", [sample_row("rois", "r1", seed=2)])
    store.write_part("rois", "r2", "a", [sample_row("rois", "r2", seed=3)])
    df = store.read("rois")
    assert len(df) == 3
    assert sorted(store.read("rois", filters=[("run_id", "==", "r1")])["x"]) == [1005, 1006]


def test_unknown_column_rejected(store: CatalogStore) -> None:
    row = sample_row("rois", "r1") | {"colour": "red"}
    with pytest.raises(ValueError, match="colour"):
        store.write_part("rois", "r1", "p", [row])
    assert not (store.root / "rois").exists()


def test_missing_or_null_required_column_rejected(store: CatalogStore) -> None:
    row = sample_row("rois", "r1")
    del row["frame_index"]
    with pytest.raises(ValueError, match="frame_index"):
        store.write_part("rois", "r1", "p", [row])
    with pytest.raises(ValueError, match="video_id"):
        store.write_part("rois", "r1", "p", [sample_row("rois", "r1") | {"video_id": None}])


def test_missing_nullable_column_reads_null(store: CatalogStore) -> None:
    row = sample_row("rois", "r1")
    del row["score"]
    store.write_part("rois", "r1", "p", [row])
    assert store.read("rois")["score"].isna().all()


def test_lossy_or_ambiguous_values_rejected(store: CatalogStore) -> None:
    with pytest.raises(ValueError, match="'x'"):
        store.write_part("rois", "r1", "p", [sample_row("rois", "r1") | {"x": 10.5}])
    with pytest.raises(ValueError, match="naive"):
        store.write_part("metrics", "r1", "p",
                         [sample_row("metrics", "r1") | {"created_at": datetime(2024, 1, 1)}])
    with pytest.raises(ValueError, match="'w'"):
        store.write_part("rois", "r1", "p", [sample_row("rois", "r1") | {"w": 2**40}])
    with pytest.raises(ValueError, match="differs"):
        store.write_part("rois", "r1", "p", [sample_row("rois", "r2")])


def test_integral_float_and_aware_datetime_are_cast(store: CatalogStore) -> None:
    paris = timezone(timedelta(hours=2))
    row = sample_row("metrics", "r1") | {"value": 3, "created_at": datetime(2024, 1, 1, 2, tzinfo=paris)}
    store.write_part("metrics", "r1", "p", [row])
    store.write_part("rois", "r1", "p", [sample_row("rois", "r1") | {"x": 7.0}])
    metrics = store.read("metrics")
    assert metrics["value"][0] == 3.0
    assert metrics["created_at"][0] == datetime(2024, 1, 1, 0, tzinfo=timezone.utc)
    assert store.read("rois")["x"][0] == 7


def test_older_file_without_new_column_reads_null(store: CatalogStore) -> None:
    old_schema = pa.schema([f for f in SCHEMAS["metrics"] if f.name != "high"])
    old_row = {k: v for k, v in sample_row("metrics", "r0").items() if k != "high"}
    (store.root / "metrics").mkdir(parents=True)
    pq.write_table(pa.Table.from_pylist([old_row], schema=old_schema),
                   store.root / "metrics" / "r0__old.parquet")
    store.write_part("metrics", "r1", "new", [sample_row("metrics", "r1", seed=5)])
    df = store.read("metrics").sort_values("run_id")
    assert list(df.columns) == SCHEMAS["metrics"].names
    assert df["high"].isna().tolist() == [True, False]


def test_empty_table_has_columns(store: CatalogStore) -> None:
    for table, schema in SCHEMAS.items():
        df = store.read(table)
        assert df.empty and list(df.columns) == schema.names
    assert store.write_part("rois", "r1", "p", []) is None
    assert not (store.root / "rois").exists()
    assert store.latest_video_status() == {} and store.completed_video_ids() == set()


def test_latest_status_follows_finished_at(store: CatalogStore) -> None:
    later = T0 + timedelta(hours=1)
    store.write_part("videos", "r1", "a", [video_row("r1", "a", "failed", T0)])
    store.write_part("videos", "r2", "a", [video_row("r2", "a", "done", later)])
    # For "b" the later finish sits in the file that sorts and is written first:
    # neither file order nor run id may decide, only finished_at.
    store.write_part("videos", "r1", "b", [video_row("r1", "b", "failed", later)])
    store.write_part("videos", "r2", "b", [video_row("r2", "b", "done", T0)])
    store.write_part("videos", "r1", "c", [video_row("r1", "c", "needs_review", T0)])
    assert store.latest_video_status() == {"a": "done", "b": "failed", "c": "needs_review"}
    assert store.completed_video_ids() == {"a", "c"}


def test_no_temp_file_left_and_unsafe_parts_stay_distinct(store: CatalogStore) -> None:
    for part in ("a/b", "a_b", ".hidden"):
        store.write_part("rois", "r1", part, [sample_row("rois", "r1")])
    names = sorted(p.name for p in (store.root / "rois").iterdir())
    assert len(names) == 3
    assert all(n.endswith(".parquet") and not n.startswith((".", "_")) for n in names)
    assert len(store.read("rois")) == 3


def test_failed_write_leaves_old_file_and_no_temp(store: CatalogStore, monkeypatch) -> None:
    store.write_part("rois", "r1", "p", [sample_row("rois", "r1", seed=1)])

    def crash(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(catalogs.store.pq, "write_table", crash)
    with pytest.raises(OSError):
        store.write_part("rois", "r1", "p", [sample_row("rois", "r1", seed=2)])
    assert [p.name for p in (store.root / "rois").iterdir()] == ["r1__p.parquet"]
    assert store.read("rois")["x"].tolist() == [1005]


def test_new_run_id_sortable_and_safe() -> None:
    first, second = new_run_id(), new_run_id()
    assert first != second
    assert first[:15] <= second[:15]
    assert all(c.isalnum() or c == "-" for c in first)


def test_content_hash(tmp_path: Path) -> None:
    path = tmp_path / "clip.bin"
    data = bytes(range(256)) * 10
    path.write_bytes(data)
    digest = file_content_hash(path, chunk_size=100)  # several chunks
    assert digest == hashlib.sha256(data).hexdigest()
    path.write_bytes(data[:-1] + b"\x00")
    assert file_content_hash(path) != digest


def test_catalogs_import_nothing_of_the_project() -> None:
    allowed_roots = {"catalogs", "pyarrow", "pandas", "__future__"}
    package = Path(__file__).resolve().parents[2] / "catalogs"
    for source in package.glob("*.py"):
        for node in ast.walk(ast.parse(source.read_text())):
            if isinstance(node, ast.Import):
                roots = {alias.name.split(".")[0] for alias in node.names}
            elif isinstance(node, ast.ImportFrom):
                roots = {(node.module or "").split(".")[0]}
            else:
                continue
            for root in roots:
                assert root in allowed_roots or root in sys.stdlib_module_names, (source.name, root)
