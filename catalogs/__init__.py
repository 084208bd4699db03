"""Catalog tables (Parquet) and their store. Imports nothing else of the project."""

from catalogs.schemas import SCHEMAS, VIDEO_SUCCESS_STATUSES
from catalogs.store import CatalogStore, file_content_hash, new_run_id, utc_now

__all__ = ["CatalogStore", "SCHEMAS", "VIDEO_SUCCESS_STATUSES", "file_content_hash", "new_run_id", "utc_now"]
