"""How fast the web page paints and becomes usable on loopback (target: first paint < 1 s).

    python benchmarks/page.py [--loads 10] [--chromium /usr/bin/chromium]

Starts ``easel serve`` (mock backend) with 200 finished jobs of one user, then opens ``/``
in a fresh headless Chromium context each time (cold cache) and reads the browser's own
timings: first contentful paint, DOMContentLoaded, and "ready" (the page's first API
answers are in: models listed, the user's queue read back). Prints the median and the
worst of each, at desktop and phone size.
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
from playwright.sync_api import sync_playwright

ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
        "--no-first-run"]  # fmt: skip
SIZES = {"desktop": {"width": 1280, "height": 860}, "phone": {"width": 390, "height": 844}}


def serve(data_dir: Path, port: int) -> subprocess.Popen[bytes]:
    easel = str(Path(sys.executable).with_name("easel"))
    process = subprocess.Popen(
        [easel, "serve", "--port", str(port), "--backend", "mock", "--data-dir", str(data_dir)],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        try:
            if httpx.get(f"http://127.0.0.1:{port}/health").status_code == 200:
                return process
        except httpx.TransportError:
            time.sleep(0.1)
    process.kill()
    raise SystemExit("easel serve did not start")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--loads", type=int, default=10)
    parser.add_argument("--port", type=int, default=8765)
    parser.add_argument("--chromium", default="/usr/bin/chromium")
    args = parser.parse_args()
    url = f"http://127.0.0.1:{args.port}"
    with tempfile.TemporaryDirectory() as tmp:
        process = serve(Path(tmp) / "data", args.port)
        try:
            for i in range(200):
                body = {"prompt": f"job {i}", "user_id": "bench", "width": 64, "height": 64,
                        "steps": 1}  # fmt: skip
                httpx.post(f"{url}/v1/jobs", json=body).raise_for_status()
            while (q := httpx.get(f"{url}/v1/queue").json())["queued"] or q["running"]:
                time.sleep(0.2)  # measure an idle server, not one still running the jobs
            with sync_playwright() as playwright:
                browser = playwright.chromium.launch(executable_path=args.chromium, args=ARGS)
                print(f"easel web page on loopback, {args.loads} cold loads each, 200 jobs listed")
                for name, viewport in SIZES.items():
                    paints, dom, ready = [], [], []
                    for _ in range(args.loads):
                        context = browser.new_context(viewport=viewport)
                        context.add_init_script("localStorage.setItem('easel.user', 'bench')")
                        page = context.new_page()
                        page.goto(url)
                        page.wait_for_selector("#my-jobs .job")
                        timings = page.evaluate(
                            """() => {
                              const nav = performance.getEntriesByType('navigation')[0];
                              const fcp = performance.getEntriesByName('first-contentful-paint')[0];
                              return [fcp ? fcp.startTime : NaN, nav.domContentLoadedEventEnd,
                                      performance.now()];
                            }"""
                        )
                        paints.append(timings[0])
                        dom.append(timings[1])
                        ready.append(timings[2])
                        context.close()
                    print(
                        f"  {name:8} first paint p50 {statistics.median(paints):6.0f} ms"
                        f" max {max(paints):6.0f} ms | DOMContentLoaded p50"
                        f" {statistics.median(dom):5.0f} ms | queue shown p50"
                        f" {statistics.median(ready):5.0f} ms max {max(ready):5.0f} ms"
                    )
                browser.close()
        finally:
            process.kill()
            process.wait()


if __name__ == "__main__":
    main()
