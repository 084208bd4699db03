"""Private module (authorities only): restore the original faces from public files.

    python -m flows.reconstruct PUBLIC_DIR OUT_DIR [--private-key FILE] [--model NAME] ...

Needs the public files and one authority's private key, nothing else: each file carries
its data key wrapped for every authority, its sealed originals and its ROIs. Writes
`OUT_DIR/reconstructed/<same relative path>.mkv` (lossless working copies) and one
hash-chained `audit` row per file into `OUT_DIR/catalogs/`. Where that catalog knows the
source video (same OUT_DIR as the anonymize run), PSNR inside the ROIs is measured
against it. `--verify-audit` checks the audit chain instead.
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

import pandas as pd
import ray
from prefect import flow, get_run_logger, task
from prefect.cache_policies import NO_CACHE
from prefect.task_runners import ThreadPoolTaskRunner

from catalogs import CatalogStore, new_run_id, utc_now
from catalogs.audit import append_audit_row, verify_audit_chain
from flows import prefect_server
from flows.runtime import (
    FAILURE_STATUSES,
    ActorPool,
    add_pipeline_arguments,
    exit_promptly,
    failure_status,
    format_table,
    hidden_partials,
    prestart_pool,
    publish_summary,
    run_in_output_folder,
    scan_videos,
    worker_pool,
)
from tasks.datapath.encode import LOSSLESS_CODECS
from tasks.datapath.keys import DEFAULT_PRIVATE_KEY, AuthorityPrivateKey, KeyFileError, load_private_key
from tasks.datapath.ray_actor import why_worker_died
from tasks.datapath.video_loop import PipelineSettings

SUMMARY_COLUMNS = [("name", "video"), ("frames", "frames"), ("faces", "faces"), ("sequences", "sequences"),
                   ("anonymize_fps", "anon fps"), ("restore_fps", "restore fps"), ("size_ratio", "size/src"),
                   ("restore_path", "restored by"), ("chunks", "chunks ok"), ("psnr_roi", "PSNR roi dB"),
                   ("release", "release check"), ("status", "status"), ("error", "error")]


def _sources_by_public_path(catalog: CatalogStore) -> dict[str, dict[str, Any]]:
    """Latest successful `videos` row per public stream path, to find each stream's source."""
    videos = catalog.read("videos")
    videos = videos[videos["status"].isin(["done", "needs_review"])].sort_values("finished_at")
    return {str(Path(r["output_path"]).resolve()): r for r in videos.to_dict("records") if r["output_path"]}


@task(retries=2, retry_delay_seconds=2, task_run_name="reconstruct {public.name}", cache_policy=NO_CACHE)
def reconstruct_one(public: Path, output: Path, pool: ActorPool, private_key: AuthorityPrivateKey, run_id: str,
                    catalog_root: str, source: dict[str, Any] | None) -> dict[str, Any]:
    """One public file on one actor; the audit row is chained whatever the outcome."""
    logger = get_run_logger()
    started = utc_now()
    source_path = source["source_path"] if source and Path(source["source_path"]).is_file() else None
    row: dict[str, Any] = dict(run_id=run_id, public_path=str(public), output_path=None,
                               key_fingerprint=private_key.fingerprint, operator=getpass.getuser(),
                               host=socket.gethostname(), started_at=started, restore_path="none")
    for partial in hidden_partials(output.parent, output):  # an earlier attempt's, if its worker died
        partial.unlink(missing_ok=True)
    try:
        with pool.acquire() as actor:
            record = ray.get(actor.reconstruct.remote(str(public), str(output), private_key, source_path))
    except ray.exceptions.RayTaskError as err:
        cause = err.cause if getattr(err, "cause", None) is not None else err
        row.update(video_id=source["video_id"] if source else "unknown", status=failure_status(cause),
                   error=f"{type(cause).__name__}: {cause}")
        logger.error("%s %s: %s", public, row["status"], row["error"])
    except ray.exceptions.RayActorError as err:
        # Every attempt is audited, this one too, before Prefect retries on a fresh worker.
        logger.warning("%s: the worker died mid-file, %s. Retried on a fresh worker", public.name,
                       why_worker_died(err))
        finished = utc_now()
        append_audit_row(CatalogStore(catalog_root), dict(
            row, video_id=source["video_id"] if source else "unknown", status="interrupted",
            error=f"worker died: {type(err).__name__}", finished_at=finished,
            seconds_total=(finished - started).total_seconds()))
        raise
    else:
        invalid, failed = record["frames_payload_invalid"], record["chunks_failed"]
        row.update(video_id=record["video_id"] or "unknown", output_path=str(output),
                   restore_path=record["restore_path"], seal=record["seal"],
                   frames=record["frames"], frames_with_payload=record["frames_with_payload"],
                   frames_payload_invalid=invalid, rois_restored=record["rois_restored"],
                   chunks_total=record["chunks_total"], chunks_failed=failed, psnr_roi=record["psnr_roi"],
                   # Frames whose payload failed, or chunks that did not verify, were left as they were: say so.
                   status="done" if invalid == 0 and failed == 0 else "partial",
                   error="; ".join(record["invalid_examples"]) or None)
        logger.info("%s → %s: restored by %s, %d frames, %d ROIs, %d of %d sealed chunks failed, "
                    "%d frames without a valid payload", public.name, output, record["restore_path"],
                    record["frames"], record["rois_restored"], failed, record["chunks_total"], invalid)
    finished = utc_now()
    row.update(finished_at=finished, seconds_total=(finished - started).total_seconds())
    append_audit_row(CatalogStore(catalog_root), row)
    return row


def pipeline_settings(model: str, weights: str | None, restore_format: str, batch_size: int,
                      device: str) -> PipelineSettings:
    """The actors' settings from the flow's parameters (also used to start them before the flow)."""
    return PipelineSettings(model=model, weights=weights, restore_format=restore_format, batch_size=batch_size,
                            device=device, progress_style="bar" if sys.stderr.isatty() else "lines")


@flow(name="reconstruct-public-streams", task_runner=ThreadPoolTaskRunner(max_workers=8))
def reconstruct_streams(
    public_dir: str,
    out_dir: str,
    private_key: str | None = None,
    model: str = PipelineSettings.model,
    weights: str | None = None,
    restore_format: str = PipelineSettings.restore_format,
    batch_size: int = PipelineSettings.batch_size,
    workers: int | None = None,
    ray_address: str | None = None,
    device: str = "auto",
) -> list[dict[str, Any]]:
    """Reconstruct every public file under `public_dir` with the authority's `private_key` file
    (default `.keys/authority.key`); returns one summary row per file."""
    logger = get_run_logger()
    public_root, out = Path(public_dir), Path(out_dir)
    if not public_root.is_dir():
        raise FileNotFoundError(f"public stream folder not found: {public_root}")
    key = load_private_key(private_key or DEFAULT_PRIVATE_KEY)  # never created here: a new key restores nothing
    catalog = CatalogStore(out / "catalogs")
    settings = pipeline_settings(model, weights, restore_format, batch_size, device)
    run_id, started = new_run_id(), utc_now()
    run_row = dict(run_id=run_id, flow="reconstruct", started_at=started, input_dir=str(public_root),
                   output_dir=str(out), params_json=json.dumps(asdict(settings), sort_keys=True),
                   key_id=key.fingerprint, host=socket.gethostname(), status="running")
    with run_in_output_folder(catalog, out, out / "reconstructed", run_row, logger) as finish:
        publics = [p for p in scan_videos(public_root, exclude=[out / "reconstructed"]) if p.suffix == ".mkv"]
        sources = _sources_by_public_path(catalog)
        logger.info("%d public streams to reconstruct (run %s)", len(publics), run_id)
        rows: list[dict[str, Any]] = []
        if publics:
            pool = worker_pool(settings, workers, ray_address)
            try:
                futures = [reconstruct_one.submit(p, out / "reconstructed" / p.relative_to(public_root), pool,
                                                  key, run_id, str(catalog.root), sources.get(str(p.resolve())))
                           for p in publics]
                for public, future in zip(publics, futures):
                    try:
                        rows.append(future.result())
                    except Exception as err:  # retries exhausted: keep going with the others
                        rows.append(dict(public_path=str(public), status="interrupted",
                                         error=f"{type(err).__name__}: {err}"))
            finally:
                pool.shutdown()
        finish(rows, len(publics), 0)
    for row in rows:
        src = sources.get(str(Path(row["public_path"]).resolve()), {})
        review = src.get("review_frames")
        row.update(name=Path(src.get("source_path") or row["public_path"]).name, faces=src.get("faces"),
                   # The anonymize run's release check, from the catalog: passed, or the frames to review.
                   release=None if not src else f"review frames {review}" if src.get("status") == "needs_review"
                   else "passed",
                   sequences=src.get("sequences"), anonymize_fps=src.get("fps_processed"),
                   restore_fps=row["frames"] / row["seconds_total"] if row.get("frames") else None,
                   # Rows of an older release's runs lack the size: pandas gives NA there.
                   size_ratio=src["public_bytes"] / src["source_bytes"] if pd.notna(src.get("public_bytes")) else None,
                   chunks=f"{row['chunks_total'] - row['chunks_failed']}/{row['chunks_total']}"
                   if row.get("chunks_total") else None)
    publish_summary("reconstruct", run_id, rows, SUMMARY_COLUMNS)
    return rows


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m flows.reconstruct", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("public_dir", help="folder tree of public streams (.mkv)")
    p.add_argument("out_dir", help="writes OUT_DIR/reconstructed/ and audit rows to OUT_DIR/catalogs/")
    p.add_argument("--private-key", help=f"an authority's private key (PKCS#8 PEM; default {DEFAULT_PRIVATE_KEY})")
    p.add_argument("--restore-format", default=PipelineSettings.restore_format, choices=sorted(LOSSLESS_CODECS),
                   help="the working copies' lossless format")
    p.add_argument("--verify-audit", action="store_true",
                   help="only check OUT_DIR's audit chain and report the first row where it breaks")
    add_pipeline_arguments(p)
    return p


def main(argv: list[str] | None = None) -> int:
    args = vars(build_parser().parse_args(argv))
    if args.pop("verify_audit"):
        problem = verify_audit_chain(CatalogStore(Path(args["out_dir"]) / "catalogs"))
        print(problem or "audit chain intact")
        return 1 if problem else 0
    start = time.perf_counter()
    try:  # a key problem is the same for every file: say it once, before any work
        load_private_key(args["private_key"] or DEFAULT_PRIVATE_KEY)
    except KeyFileError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    if Path(args["public_dir"]).is_dir():
        # Ray and the actors' models load while Prefect's server starts (flows/prefect_server.py).
        prestart_pool(pipeline_settings(args["model"], args["weights"], args["restore_format"], args["batch_size"],
                                        args["device"]), args["workers"], args["ray_address"])
    prefect_server.wait_until_ready()
    rows = reconstruct_streams(**args)
    print(format_table(rows, SUMMARY_COLUMNS))
    print(f"{len(rows)} streams in {time.perf_counter() - start:.1f} s")
    return 1 if any(r.get("status") in FAILURE_STATUSES for r in rows) else 0


if __name__ == "__main__":
    exit_promptly(main())
