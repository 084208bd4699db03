"""Check an output folder against its catalogs (reads only; see tasks/datapath/catalog_check.py).

    python -m flows.check_catalogs OUT_DIR

Prints each problem, or "OUT_DIR: complete ..." when there are none; exit code 1 when there are.
"""
from __future__ import annotations

import argparse
import sys

from catalogs import CatalogStore
from tasks.datapath.catalog_check import check_output_folder


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m flows.check_catalogs", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("out_dir", help="an output folder of python -m flows.anonymize")
    out = parser.parse_args(argv).out_dir
    problems = check_output_folder(out)
    for problem in problems:
        print(problem)
    if problems:
        print(f"{out}: {len(problems)} problem(s)")
        return 1
    done = CatalogStore(f"{out}/catalogs").completed_video_ids()
    videos = f"{len(done)} video{'' if len(done) == 1 else 's'}"
    print(f"{out}: complete, {videos} done, each public file present with its recorded frame count")
    return 0


if __name__ == "__main__":
    sys.exit(main())
