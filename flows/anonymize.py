"""Public module: anonymize every video of an archive into releasable public streams.

    python -m flows.anonymize ARCHIVE_DIR OUT_DIR [--public-key FILE ...] [--format h264] [--seal high] ...

Writes `OUT_DIR/public/<same relative path>.mkv` (every frame and the audio kept, faces
replaced, the originals sealed to the authorities' public keys inside the file) and the
catalogs under `OUT_DIR/catalogs/`. Needs public keys only: nothing here can reverse a
video. Incremental: a video whose content hash the catalog already holds as done is
skipped. Originals are only read.
"""
from __future__ import annotations

import argparse
import getpass
import json
import socket
import sys
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

import ray
from prefect import flow, get_run_logger, task
from prefect.cache_policies import NO_CACHE
from prefect.task_runners import ThreadPoolTaskRunner

from catalogs import VIDEO_SUCCESS_STATUSES, CatalogStore, file_content_hash, new_run_id, utc_now
from flows import prefect_server
from flows.runtime import (
    FAILURE_STATUSES,
    ActorPool,
    add_pipeline_arguments,
    clear_attempt,
    exit_promptly,
    failure_status,
    format_table,
    public_names,
    publish_summary,
    prestart_pool,
    run_in_output_folder,
    scan_videos,
    written_public_names,
    worker_pool,
)
from tasks.datapath.anonymize import check_release_shared
from tasks.datapath.encode import VIDEO_FORMATS
from tasks.datapath.keys import (
    DEFAULT_PRIVATE_KEY,
    DEFAULT_PUBLIC_KEY,
    AuthorityPublicKey,
    DataKey,
    KeyFileError,
    load_public_key,
    public_keys_for_anonymize,
)
from tasks.datapath.ray_actor import why_worker_died
from tasks.datapath.seal import QUALITIES
from tasks.datapath.segments import anonymize_split, split_plan
from tasks.datapath.video_loop import PipelineSettings

SUMMARY_COLUMNS = [("name", "video"), ("frame_count", "frames"), ("faces", "faces"),
                   ("sequences", "sequences"), ("fps_processed", "fps"), ("status", "status"),
                   ("review_frames", "review frames"), ("error", "error")]


def _video_row(run_id: str, source: Path, video_id: str, settings: PipelineSettings, recipients: str,
               started, status: str, record: dict[str, Any] | None = None,
               error: str | None = None) -> dict[str, Any]:
    finished = utc_now()
    row: dict[str, Any] = dict(
        video_id=video_id, source_path=str(source), source_bytes=source.stat().st_size,
        status=status, error=error, public_format=settings.public_format, seal=settings.seal,
        model=settings.model, recipients=recipients,
        run_id=run_id, started_at=started, finished_at=finished,
        seconds_total=(finished - started).total_seconds())
    if record:
        seconds = record["seconds"]
        row.update({k: record[k] for k in ("width", "height", "frame_count", "fps", "fps_rational",
                                             "audio_streams", "faces", "sequences", "frames_with_faces",
                                             "frames_detected", "output_path", "public_bytes", "sealed_bytes",
                                             "seal_psnr_db", "seal_min_psnr_db")})
        row.update({f"seconds_{stage}": seconds.get(stage) for stage in
                    ("decode", "detect", "seal", "deidentify", "stego", "encode")})
        row["fps_processed"] = record["frame_count"] / seconds["total"] if seconds.get("total") else None
        # The release check's findings, e.g. "12,57" and "face outside ROIs at frames 12,57".
        row["review_frames"] = ",".join(map(str, record["review_frames"])) or None
        row["review_reason"] = record["review_reason"]
    return row


# NO_CACHE: inputs hold live actor handles; a video must never be "cached" as done.
@task(retries=2, retry_delay_seconds=2, task_run_name="anonymize {source.name}", cache_policy=NO_CACHE)
def anonymize_one(source: Path, output: Path, video_id: str, pool: ActorPool, recipients: list[AuthorityPublicKey],
                  run_id: str, catalog_root: str, settings: PipelineSettings, split_workers: int = 1) -> dict[str, Any]:
    """One video on one actor, or split across `split_workers` of them when it is long
    (tasks/datapath/segments.py).

    A failure inside the video's own work is recorded here, as `failed` when the input is at
    fault and `interrupted` otherwise (see flows.runtime.failure_status); only a dead actor
    raises, so Prefect retries the video on a fresh one."""
    logger = get_run_logger()
    catalog = CatalogStore(catalog_root)
    started = utc_now()
    fingerprints = _fingerprints(recipients)
    clear_attempt(catalog, run_id, video_id, output)  # what an earlier attempt left, if one died
    try:
        segments = split_plan(source, split_workers, pool.settings)
        if len(segments) > 1:
            logger.info("%s: %d segments (from frames %s), run on up to %d workers at once", source.name,
                        len(segments), ", ".join(str(s.start) for s in segments), split_workers)
            record = anonymize_split(source, output, segments, pool.call, split_workers, recipients=recipients,
                                     video_id=video_id, settings=pool.settings, run_id=run_id,
                                     catalog=catalog).as_dict()
        else:
            data_key = DataKey.generate()
            with pool.acquire() as actor:
                written = ray.get(actor.anonymize.remote(str(source), str(output), recipients, video_id,
                                                          run_id, catalog_root, data_key, False))
            # The check shared out among the workers free now (this video's own included): a
            # lone long video's check no longer runs on one worker while the others wait.
            check_release_shared(pool.call, pool.idle(), output, source, written, data_key, pool.settings)
            record = written.as_dict()
    except ray.exceptions.RayActorError as err:
        logger.warning("%s: the worker died mid-video, %s. Its partial output is removed and the video "
                       "retried on a fresh worker", source.name, why_worker_died(err))
        clear_attempt(catalog, run_id, video_id, output)
        raise
    except Exception as err:  # the video's own work failed (on a worker, or joining a split video's parts)
        cause = err.cause if isinstance(err, ray.exceptions.RayTaskError) and err.cause is not None else err
        message = f"{type(cause).__name__}: {cause}"
        status = failure_status(cause)
        logger.error("%s %s: %s", source, "failed" if status == "failed" else
                     "interrupted (tried again by the next run)", message)
        clear_attempt(catalog, run_id, video_id, output)
        row = _video_row(run_id, source, video_id, settings, fingerprints, started, status, error=message)
    else:
        if record["needs_review"] is None:  # a bug, not the input: no video is `done` unchecked
            raise RuntimeError(f"{source}: written without its release check")
        status = "needs_review" if record["needs_review"] else "done"
        row = _video_row(run_id, source, video_id, settings, fingerprints, started, status, record)
        if record["needs_review"]:
            logger.warning("%s needs review before release: %s", source.name, record["review_reason"])
        logger.info("%s → %s: %d frames, %d faces, %.1f fps, %.2f MB (sealed %.2f MB), sealed to %s",
                    source.name, output, row["frame_count"], row["faces"], row["fps_processed"] or 0,
                    row["public_bytes"] / 1e6, row["sealed_bytes"] / 1e6, fingerprints)
    catalog.write_part("videos", run_id, video_id, [row])
    return row


def _fingerprints(keys: list[AuthorityPublicKey]) -> str:
    return ",".join(k.fingerprint for k in keys)


def pipeline_settings(model: str, weights: str | None, public_format: str, seal: str,
                      batch_size: int = PipelineSettings.batch_size,
                      min_face_size: int = PipelineSettings.min_face_size, max_gap: int = PipelineSettings.max_gap,
                      detect_every: int = PipelineSettings.detect_every,
                      segment_frames: int = PipelineSettings.segment_frames, device: str = "auto") -> PipelineSettings:
    """The actors' settings from the flow's parameters (also used to start them before the flow)."""
    return PipelineSettings(model=model, weights=weights, public_format=public_format, seal=seal,
                            batch_size=batch_size, min_face_size=min_face_size, max_gap=max_gap,
                            detect_every=detect_every, segment_frames=segment_frames, device=device,
                            progress_style="bar" if sys.stderr.isatty() else "lines")


@flow(name="anonymize-archive", task_runner=ThreadPoolTaskRunner(max_workers=8))
def anonymize_archive(
    archive_dir: str,
    out_dir: str,
    public_keys: list[str] | None = None,
    model: str = PipelineSettings.model,
    weights: str | None = None,
    public_format: str = PipelineSettings.public_format,
    seal: str = PipelineSettings.seal,
    batch_size: int = PipelineSettings.batch_size,
    min_face_size: int = PipelineSettings.min_face_size,
    max_gap: int = PipelineSettings.max_gap,
    detect_every: int = PipelineSettings.detect_every,
    segment_frames: int = PipelineSettings.segment_frames,
    workers: int | None = None,
    ray_address: str | None = None,
    device: str = "auto",
    retry_failed: bool = False,
) -> list[dict[str, Any]]:
    """Anonymize every new video under `archive_dir`; returns one summary row per video.

    Videos whose content hash the catalog holds as done are skipped; so are those that
    failed before (a corrupt file fails again) unless `retry_failed`. `public_keys`: the
    authorities' public key files, each able to reverse alone (default `.keys/authority.pub`,
    created with its private key on a first run when neither exists).
    """
    logger = get_run_logger()
    archive, out = Path(archive_dir), Path(out_dir)
    if not archive.is_dir():
        raise FileNotFoundError(f"archive folder not found: {archive}")
    public_root, catalog = out / "public", CatalogStore(out / "catalogs")
    recipients, created = public_keys_for_anonymize(public_keys)
    if created:
        logger.warning("created an authority key pair: %s (private, fingerprint %s) and %s. Back the private "
                       "key up and move it off this host: whoever holds it can reverse every public file sealed "
                       "to it, and without it none can be reversed", DEFAULT_PRIVATE_KEY,
                       recipients[0].fingerprint, DEFAULT_PUBLIC_KEY)
    logger.info("sealing to %d authority key(s): %s", len(recipients), _fingerprints(recipients))
    settings = pipeline_settings(model, weights, public_format, seal, batch_size, min_face_size, max_gap,
                                 detect_every, segment_frames, device)
    run_id, started = new_run_id(), utc_now()
    params = dict(asdict(settings), archive_dir=str(archive), out_dir=str(out),
                  public_keys=[str(k.path) for k in recipients])
    run_row = dict(run_id=run_id, flow="anonymize", started_at=started, input_dir=str(archive),
                   output_dir=str(out), params_json=json.dumps(params, sort_keys=True),
                   key_id=_fingerprints(recipients),
                   host=socket.gethostname(), status="running")
    with run_in_output_folder(catalog, out, public_root, run_row, logger) as finish:
        rows, sources, skipped = _run_jobs(archive, out, catalog, public_root, recipients, settings, run_id,
                                           started, workers, ray_address, retry_failed, logger)
        finish(rows, len(sources), len(skipped))
    for row in rows:
        row["name"] = Path(row["source_path"]).name
    rows += [dict(name=s.name, status=f"skipped ({why})") for s, why in skipped]
    publish_summary("anonymize", run_id, rows, SUMMARY_COLUMNS)
    return rows


def _run_jobs(archive: Path, out: Path, catalog: CatalogStore, public_root: Path,
              recipients: list[AuthorityPublicKey], settings: PipelineSettings, run_id: str, started,
              workers: int | None, ray_address: str | None, retry_failed: bool, logger):
    """Scan, skip what is done (or failed for good), and fan the rest out to the actors."""
    sources = scan_videos(archive, exclude=[out])
    known = catalog.latest_video_status()
    video_ids = [file_content_hash(source) for source in sources]
    names = public_names([s.relative_to(archive) for s in sources], video_ids,
                         written_public_names(catalog, public_root))
    jobs, skipped, seen = [], [], set()
    for source, video_id, name in zip(sources, video_ids, names):
        status = known.get(video_id)
        if video_id in seen or status in VIDEO_SUCCESS_STATUSES or (status == "failed" and not retry_failed):
            skipped.append((source, f"{status} before" if status else "same content as another file"))
            continue
        seen.add(video_id)
        jobs.append((source, public_root / name, video_id))
    logger.info("%d videos found, %d to anonymize, %d skipped as seen before (run %s)",
                len(sources), len(jobs), len(skipped), run_id)

    rows: list[dict[str, Any]] = []
    if jobs:
        pool = worker_pool(settings, workers, ray_address)
        logger.info("workers: %s", pool.describe())
        try:
            # A source's bytes stand in for its work (frames times pixels, which only decoding
            # would tell), for the split shares and the order alike.
            sizes = [source.stat().st_size for source, _, _ in jobs]
            shares = split_shares(sizes, pool.size)
            # Largest first (the actors take videos in the order they are asked), so that a long
            # video does not start last and run alone while the other workers wait; the rows
            # stay in the scan's order.
            futures = {i: anonymize_one.submit(*jobs[i], pool, recipients, run_id, str(catalog.root),
                                               pool.settings, shares[i]) for i in largest_first(sizes)}
            for i, (src, dst, vid) in enumerate(jobs):
                try:
                    rows.append(futures[i].result())
                except Exception as err:  # retries exhausted (the actor kept dying): record, go on
                    clear_attempt(catalog, run_id, vid, dst)
                    row = _video_row(run_id, src, vid, settings, _fingerprints(recipients), started,
                                     "interrupted", error=f"{type(err).__name__}: {err}")
                    catalog.write_part("videos", run_id, vid, [row])
                    rows.append(row)
        finally:
            pool.shutdown()
    return rows, sources, skipped


def split_shares(sizes: list[int], actors: int) -> list[int]:
    """Per video, how many actors it may be split across at once (`anonymize_one`'s split_workers).

    A video gets the actors the other videos leave over (each of them keeps one), or its share
    of the archive's work (`sizes`, its bytes over the archive's), whichever is
    more: one 10-hour file among a night's short clips takes most of the actors instead of
    keeping one busy for hours while the others wait. Shares may add up to more than the
    actors: segments queue for a free actor like whole videos do. Whether a video is long
    enough to split at all is `segments.split_plan`'s call.
    """
    total = sum(sizes)
    left_over = actors - len(sizes) + 1
    return [max(1, min(actors, max(left_over, round(actors * size / total) if total else 0))) for size in sizes]


def largest_first(sizes: list[int]) -> list[int]:
    """Indices of the videos, the largest source file first; ties in scan order."""
    return sorted(range(len(sizes)), key=lambda i: -sizes[i])


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m flows.anonymize", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("archive_dir", help="folder tree of source videos (read only)")
    p.add_argument("out_dir", help="writes OUT_DIR/public/ and OUT_DIR/catalogs/")
    p.add_argument("--public-key", dest="public_keys", action="append", metavar="FILE",
                   help="an authority's public key (PEM); repeat for several authorities, each able to reverse "
                   f"alone (default {DEFAULT_PUBLIC_KEY}, created with {DEFAULT_PRIVATE_KEY} when neither exists)")
    p.add_argument("--format", dest="public_format", default=PipelineSettings.public_format,
                   choices=sorted(VIDEO_FORMATS), help="h264: the release format (default); x264rgb, ffv1: lossless, "
                   "with the ROIs and the wrapped key in the pixels as well")
    p.add_argument("--seal", default=PipelineSettings.seal, choices=QUALITIES,
                   help="the original faces sealed inside the file: high (>= 42 dB, default), exact (bit-exact), "
                   "none (reversal by the learned decoder only, the paper's mode)")
    add_pipeline_arguments(p)
    p.add_argument("--min-face-size", type=int, default=PipelineSettings.min_face_size)
    p.add_argument("--max-gap", type=int, default=PipelineSettings.max_gap,
                   help="detector gaps up to this many frames inside a track are filled")
    p.add_argument("--detect-every", type=int, default=PipelineSettings.detect_every,
                   help="run the detector on every Nth frame, and on every frame between two that disagree "
                   "(1: every frame)")
    p.add_argument("--segment-frames", type=int, default=PipelineSettings.segment_frames,
                   help="split a video of at least twice this many frames at keyframes into segments of at least "
                   "this many, run on several workers at once (0: one worker per video)")
    p.add_argument("--retry-failed", action="store_true", help="try again videos that failed in earlier runs")
    return p


def main(argv: list[str] | None = None) -> int:
    args = vars(build_parser().parse_args(argv))
    start = time.perf_counter()
    try:  # a key problem is the same for every video: say it once, before any work
        for path in args["public_keys"] or []:
            load_public_key(path)
    except KeyFileError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    try:
        settings = pipeline_settings(args["model"], args["weights"], args["public_format"], args["seal"],
                                     args["batch_size"], args["min_face_size"], args["max_gap"],
                                     args["detect_every"], args["segment_frames"], args["device"])
    except ValueError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    if Path(args["archive_dir"]).is_dir():
        # Ray and the actors' models load while Prefect's server starts (flows/prefect_server.py).
        prestart_pool(settings, args["workers"], args["ray_address"])
    prefect_server.wait_until_ready()
    rows = anonymize_archive(**args)
    print(format_table(rows, SUMMARY_COLUMNS))
    print(f"{len(rows)} video{'' if len(rows) == 1 else 's'} in {time.perf_counter() - start:.1f} s "
          f"(run by {getpass.getuser()})")
    return 1 if any(r.get("status") in FAILURE_STATUSES for r in rows) else 0


if __name__ == "__main__":
    exit_promptly(main())
