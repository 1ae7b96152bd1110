"""Screenshot of the ``moe-monitor report`` HTML page of one or several runs, taken with headless Chromium.

Writes the report (or the comparison of several runs) to an HTML file and captures it as a PNG, to look at the
page the way a browser lays it out (full width, titles that fit) without opening one.

Usage::

    python scripts/report_screenshot.py RUN_DIR [RUN_DIR ...] --out report.png [--html report.html]

Chromium: found or installed as in ``scripts/tensorboard_screenshot.py``.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from tensorboard_screenshot import capture, find_chromium  # noqa: E402

from moe_monitor.report import write_report  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("run_dirs", nargs="+", type=Path, metavar="RUN_DIR", help="run folders to report on")
    parser.add_argument("--out", type=Path, required=True, help="PNG file to write")
    parser.add_argument("--html", type=Path, default=None, help="also keep the HTML here (default: a temp file)")
    parser.add_argument("--width", type=int, default=1400)
    parser.add_argument("--height", type=int, default=3000)
    parser.add_argument("--no-install", action="store_true", help="never apt-get install chromium")
    args = parser.parse_args(argv)
    chromium = find_chromium(install=not args.no_install)
    with tempfile.TemporaryDirectory(prefix="moe-report-") as tmp:
        page = args.html if args.html is not None else Path(tmp) / "report.html"
        write_report(args.run_dirs if len(args.run_dirs) > 1 else args.run_dirs[0], page)
        args.out.parent.mkdir(parents=True, exist_ok=True)
        capture(chromium, page.resolve().as_uri(), args.out.resolve(), args.width, args.height, budget_ms=2000)
    print(args.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
