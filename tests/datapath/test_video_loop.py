"""The per-video loops' shared process setting: glibc's mmap threshold held fixed."""
from __future__ import annotations

import platform

import pytest

from tasks.datapath.video_loop import bound_heap_fragmentation


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="mallopt is glibc's")
def test_the_mmap_threshold_is_accepted_by_glibc():
    # mallopt returns 0 for a parameter or value it rejects: a wrong constant would show here.
    assert bound_heap_fragmentation() is True


def test_line_progress_writes_plain_lines_no_escape_codes_and_one_at_the_end() -> None:
    import io

    from tasks.datapath.video_loop import LineProgress, progress_bar

    quiet = io.StringIO()
    bar = LineProgress(40, "anonymize a.mp4", every_s=3600, stream=quiet)
    bar.update(16)
    bar.update(24)
    assert quiet.getvalue() == ""  # nothing between lines
    bar.close()
    (line,) = quiet.getvalue().splitlines()
    assert line.startswith("anonymize a.mp4: 40/40 frames (100 %), ") and line.endswith(" fps")
    chatty = io.StringIO()
    bar = LineProgress(40, "x", every_s=0, stream=chatty)
    bar.update(10)
    bar.close()
    assert [x.split(" frames")[0] for x in chatty.getvalue().splitlines()] == ["x: 10/40", "x: 10/40"]
    assert "\x1b" not in chatty.getvalue() + quiet.getvalue()
    assert isinstance(progress_bar(5, "y", True, "lines"), LineProgress) and progress_bar(5, "y", False) is None
