"""The catalog check finds each kind of gap between an output folder and its catalogs."""
from __future__ import annotations

import shutil

from catalogs import CatalogStore, utc_now
from flows.check_catalogs import main
from tasks.datapath.catalog_check import check_output_folder

VIDEO = "ab" * 32


def _video_row(out, frame_count, status="done", run_id="run1"):
    now = utc_now()
    return dict(video_id=VIDEO, source_path="/archive/lobby.mp4", source_bytes=1, status=status,
                output_path=str(out / "public" / "lobby.mkv"), frame_count=frame_count, public_format="h264",
                seal="high", model="uunet", recipients="f", run_id=run_id, started_at=now, finished_at=now,
                seconds_total=1.0)


def _roi_row(run_id, video_id=VIDEO):
    return dict(run_id=run_id, video_id=video_id, frame_index=0, seq_id=0, x=0, y=0, w=8, h=8, score=0.9,
                interpolated=False)


def test_a_complete_folder_passes_and_each_gap_is_named(clips, tmp_path, capsys):
    out = tmp_path / "out"
    (out / "public").mkdir(parents=True)
    shutil.copy(clips["carphone"], out / "public" / "lobby.mkv")  # 16 frames
    catalog = CatalogStore(out / "catalogs")
    catalog.write_part("videos", "run1", VIDEO, [_video_row(out, 16)])
    catalog.write_part("rois", "run1", f"{VIDEO}-00000", [_roi_row("run1")])
    assert check_output_folder(out) == []
    assert main([str(out)]) == 0 and "complete, 1 video done" in capsys.readouterr().out

    catalog.write_part("videos", "run1", VIDEO, [_video_row(out, 17)])  # the catalog says 17
    catalog.write_part("rois", "run0", f"{VIDEO}-00000", [_roi_row("run0")])  # an attempt no row vouches for
    (out / "public" / "stray.mkv").write_bytes(b"x")
    (out / "public" / ".lobby.mkv.abc.partial.mkv").write_bytes(b"x")
    problems = check_output_folder(out)
    assert len(problems) == 4
    assert "16 frames, the catalog records 17" in problems[0]
    assert "rois: rows of video abababababab in run run0" in problems[1]
    assert problems[2].endswith(".lobby.mkv.abc.partial.mkv: a temporary file left behind")
    assert problems[3].endswith("stray.mkv: a public file no successful catalog row accounts for")
    assert main([str(out)]) == 1 and "4 problem(s)" in capsys.readouterr().out
    (out / "public" / "lobby.mkv").unlink()
    assert any("public file" in p and "is missing" in p for p in check_output_folder(out))
