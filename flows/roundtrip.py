"""The main job of `make run`: anonymize an archive, then reconstruct its public streams.

    python -m flows.roundtrip ARCHIVE_DIR OUT_DIR [--public-key FILE] [--private-key FILE] ...

Both flows run as subflows of one parent, so one Prefect server start and one Ray
cluster serve the whole demonstration. On the defaults the public module seals to
`.keys/authority.pub` (made on the first run, with its private key) and the private module
opens with `.keys/authority.key`: in production those live on different machines. Prints
one summary table per video: frames, faces, sequences, anonymize and restore speed, size
against the source, how it was restored, PSNR inside the ROIs, release check, status.
"""
from __future__ import annotations

import argparse
import time
from pathlib import Path
from typing import Any

from prefect import flow

from flows.anonymize import anonymize_archive, pipeline_settings
from flows.reconstruct import SUMMARY_COLUMNS, reconstruct_streams
from flows import prefect_server
from flows.runtime import exit_promptly, format_table, prestart_pool
from tasks.datapath.video_loop import PipelineSettings


@flow(name="anonymize-then-reconstruct")
def anonymize_then_reconstruct(archive_dir: str, out_dir: str, public_keys: list[str] | None = None,
                               private_key: str | None = None, public_format: str = PipelineSettings.public_format,
                               seal: str = PipelineSettings.seal, model: str = PipelineSettings.model,
                               weights: str | None = None, workers: int | None = None,
                               ray_address: str | None = None) -> list[dict[str, Any]]:
    common = dict(model=model, weights=weights, workers=workers, ray_address=ray_address)
    anonymized = anonymize_archive(archive_dir, out_dir, public_keys=public_keys, public_format=public_format,
                                   seal=seal, **common)
    restored = reconstruct_streams(f"{out_dir}/public", out_dir, private_key=private_key, **common)
    # Failures of the public module have no public stream to restore: keep them in the summary.
    failed = [dict(name=r["name"], status=r["status"], error=r.get("error"))
              for r in anonymized if r.get("status") == "failed"]
    return restored + failed


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m flows.roundtrip", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("archive_dir")
    p.add_argument("out_dir")
    p.add_argument("--public-key", dest="public_keys", action="append", metavar="FILE")
    p.add_argument("--private-key")
    p.add_argument("--format", dest="public_format", default=PipelineSettings.public_format)
    p.add_argument("--seal", default=PipelineSettings.seal)
    p.add_argument("--model", default=PipelineSettings.model)
    p.add_argument("--weights")
    p.add_argument("--workers", type=int)
    p.add_argument("--ray-address")
    args = vars(p.parse_args(argv))
    start = time.perf_counter()
    if Path(args["archive_dir"]).is_dir():
        # Ray and the public module's actors load while Prefect's server starts (flows/prefect_server.py).
        # The settings anonymize_archive builds from the options roundtrip leaves at their defaults.
        prestart_pool(pipeline_settings(args["model"], args["weights"], args["public_format"], args["seal"]),
                      args["workers"], args["ray_address"])
    prefect_server.wait_until_ready()
    rows = anonymize_then_reconstruct(**args)
    print(format_table(rows, SUMMARY_COLUMNS))
    print(f"{len(rows)} videos in {time.perf_counter() - start:.1f} s; public files in "
          f"{args['out_dir']}/public, reconstructions in {args['out_dir']}/reconstructed, "
          f"catalogs in {args['out_dir']}/catalogs")
    return 1 if any(r.get("status") == "failed" for r in rows) else 0


if __name__ == "__main__":
    exit_promptly(main())
