"""The catalog check: does an output folder hold what its catalogs say, and nothing else?

For whoever must prove an archive complete: every video whose latest row is a success has
its public file, which decodes to the frame count recorded; no ROI or sequence rows belong
to a video that no successful row of their run vouches for; no public file is unknown to
the catalog; no run is left `running`; no temporary file lies about. Reads only.
"""
from __future__ import annotations

from pathlib import Path

from catalogs import VIDEO_SUCCESS_STATUSES, CatalogStore
from tasks.datapath.decode import VideoDecodeError, probe


def check_output_folder(out: str | Path) -> list[str]:
    """Every problem found in `out` (its `public/` and `catalogs/`), one sentence each; [] when none."""
    out = Path(out)
    catalog = CatalogStore(out / "catalogs")
    problems: list[str] = []
    videos = catalog.read("videos")
    latest = videos.sort_values(["finished_at", "run_id"], kind="stable").drop_duplicates("video_id", keep="last")
    succeeded = latest[latest["status"].isin(sorted(VIDEO_SUCCESS_STATUSES))]
    for row in succeeded.to_dict("records"):
        public = Path(row["output_path"]) if row["output_path"] else None
        if public is None or not public.is_file():
            problems.append(f"video {row['video_id'][:12]} ({row['source_path']}) is {row['status']} but its "
                            f"public file {public} is missing")
            continue
        try:
            frames = probe(public).frame_count
        except VideoDecodeError as err:
            problems.append(f"{public}: recorded {row['status']} but does not decode: {err}")
            continue
        if frames != row["frame_count"]:
            problems.append(f"{public}: {frames} frames, the catalog records {row['frame_count']}")
    vouched = set(zip(videos.loc[videos["status"].isin(sorted(VIDEO_SUCCESS_STATUSES)), "run_id"],
                      videos.loc[videos["status"].isin(sorted(VIDEO_SUCCESS_STATUSES)), "video_id"]))
    for table in ("rois", "sequences"):
        rows = catalog.read(table, columns=["run_id", "video_id"]).drop_duplicates()
        for run_id, video_id in zip(rows["run_id"], rows["video_id"]):
            if (run_id, video_id) not in vouched:
                problems.append(f"{table}: rows of video {video_id[:12]} in run {run_id} with no successful "
                                "videos row of that run (orphans of a failed attempt)")
    known = {str(Path(p).resolve()) for p in succeeded["output_path"] if p}
    public_root = out / "public"
    if public_root.is_dir():
        for path in sorted(public_root.rglob("*")):
            if not path.is_file():
                continue
            if path.name.startswith("."):
                problems.append(f"{path}: a temporary file left behind")
            elif str(path.resolve()) not in known:
                problems.append(f"{path}: a public file no successful catalog row accounts for")
    runs = catalog.read("runs")
    if not runs.empty:
        last = runs.sort_values("started_at", kind="stable").drop_duplicates("run_id", keep="last")
        for run_id in last.loc[last["status"] == "running", "run_id"]:
            problems.append(f"run {run_id} is recorded as running (in progress, or killed without closing)")
    return problems
