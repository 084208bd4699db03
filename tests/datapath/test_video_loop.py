"""The per-video loops' shared process setting: glibc's mmap threshold held fixed."""
from __future__ import annotations

import platform

import pytest

from tasks.datapath.video_loop import bound_heap_fragmentation


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="mallopt is glibc's")
def test_the_mmap_threshold_is_accepted_by_glibc():
    # mallopt returns 0 for a parameter or value it rejects: a wrong constant would show here.
    assert bound_heap_fragmentation() is True
