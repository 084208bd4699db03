"""Training metrics into the `metrics` catalog, and sample grids to disk, as the training loops report them."""
from __future__ import annotations

from pathlib import Path

import numpy as np

from catalogs import CatalogStore, utc_now


class CatalogMetrics:
    """A `MetricsHook` buffering (step, values) and appending them as `metrics` rows in parts."""

    def __init__(self, catalog: CatalogStore, run_id: str, dataset: str, method: str,
                 every: int = 10, flush_rows: int = 5000) -> None:
        self.catalog, self.run_id, self.dataset, self.method = catalog, run_id, dataset, method
        self.every, self.flush_rows = every, flush_rows
        self.rows: list[dict] = []
        self.parts = 0
        self.last: dict[str, float] = {}

    def __call__(self, step: int, values: dict[str, float]) -> None:
        self.last = {**self.last, **values}
        # Validation values are rare and matter: keep them all; subsample the per-step losses.
        keep = {k: v for k, v in values.items() if k.startswith("val_") or step % self.every == 0}
        now = utc_now()
        for name, value in keep.items():
            if value is None or not np.isfinite(value):
                continue
            self.rows.append(dict(run_id=self.run_id, dataset=self.dataset, method=self.method,
                                  metric=name, step=step, value=float(value), created_at=now))
        if len(self.rows) >= self.flush_rows:
            self.flush()

    def flush(self) -> None:
        if self.rows:
            self.catalog.write_part("metrics", self.run_id, f"{self.method}-{self.parts:04d}", self.rows)
            self.parts += 1
            self.rows = []


class SampleGrids:
    """A `SamplesHook` writing each x | a | r | r_wrong_key grid as a PNG."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self.written: list[Path] = []

    def __call__(self, step: int, grid: np.ndarray) -> None:
        from PIL import Image

        self.folder.mkdir(parents=True, exist_ok=True)
        path = self.folder / f"samples_{step:07d}.png"
        Image.fromarray(grid).save(path)
        self.written.append(path)
