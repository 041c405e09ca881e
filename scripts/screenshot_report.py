#!/usr/bin/env python
"""Screenshot a run's report.html in headless Chromium, to look at the report as a reader would.

    python scripts/screenshot_report.py RUN_DIR --out report.png [--width 1280 --height 3000]

Needs a Chromium binary on PATH (Debian: `apt-get install chromium`). Renders report.html first
(`paft report RUN_DIR`) when the folder has none.
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

BROWSERS = ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable", "chrome")


def find_browser() -> str | None:
    return next((p for p in map(shutil.which, BROWSERS) if p), None)


def screenshot(html: Path, out: Path, width: int = 1280, height: int = 3000, timeout: float = 120) -> Path:
    browser = find_browser()
    if browser is None:
        raise RuntimeError(f"no Chromium on PATH (looked for {', '.join(BROWSERS)}); apt-get install chromium")
    out = out.resolve()
    out.parent.mkdir(parents=True, exist_ok=True)
    # a throwaway profile: no state from (or into) the user's browser; --no-sandbox because CI runs as root
    with tempfile.TemporaryDirectory(prefix="paft-chromium-") as profile:
        cmd = [browser, "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars", "--no-first-run",
               "--disable-dev-shm-usage", f"--user-data-dir={profile}", f"--window-size={width},{height}",
               f"--screenshot={out}", html.resolve().as_uri()]
        res = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    if res.returncode != 0 or not out.is_file():
        raise RuntimeError(f"{browser} failed (exit {res.returncode}): {res.stderr.strip()[-2000:]}")
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("run_dir", type=Path, help="a paft run folder (with report.html, or the JSON to render it)")
    ap.add_argument("--out", type=Path, required=True, help="PNG to write")
    ap.add_argument("--width", type=int, default=1280)
    ap.add_argument("--height", type=int, default=3000)
    args = ap.parse_args(argv)
    html = args.run_dir / "report.html"
    if not html.is_file():
        from paft.config import load_config
        from paft.report import write_report

        write_report(args.run_dir, load_config(args.run_dir / "config.yaml",
                                               [f"run.output_dir={args.run_dir}"]))
    try:
        out = screenshot(html, args.out, args.width, args.height)
    except (RuntimeError, subprocess.TimeoutExpired) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    print(out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
