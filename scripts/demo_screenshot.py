"""Open the demo in a real browser, type a prompt, click Generate, and save a screenshot (docs/demo.png).

Needs Debian's Chromium (`apt-get install chromium`; a browser that `playwright install` downloads is not
used) and the `playwright` package (`pip install playwright`), which drives it:

    python scripts/demo_screenshot.py --out docs/demo.png [demo overrides, e.g. student=RUN/export]

It serves `python -m pixsig_distill.demo` in-process (the toy teacher and every student under
outputs/train by default), so run it where the main command ran.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

PROMPT = "a large red circle in the center on a white background"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="docs/demo.png")
    parser.add_argument("--chromium", default="/usr/bin/chromium")
    parser.add_argument("--prompt", default=PROMPT)
    args, overrides = parser.parse_known_args()
    if not Path(args.chromium).is_file():
        sys.exit(f"error: no Chromium at {args.chromium}; apt-get install chromium, or pass --chromium PATH")
    from hydra import compose, initialize_config_module
    from playwright.sync_api import sync_playwright

    from pixsig_distill.demo import serve

    with initialize_config_module("pixsig_distill.conf", version_base="1.3"):
        cfg = compose("demo", overrides=overrides)
    app = serve(cfg, block=False)
    try:
        with sync_playwright() as playwright:
            browser = playwright.chromium.launch(executable_path=args.chromium, headless=True,
                                                 args=["--no-sandbox"])
            page = browser.new_page(viewport={"width": 1400, "height": 900})
            page.goto(app.local_url)
            page.get_by_label("prompt").fill(args.prompt)
            began = time.time()
            page.get_by_role("button", name="Generate").click()
            n = app.pixsig_models  # every model's latency line ("… ms · N steps") is written with its image
            page.wait_for_function(f"document.body.innerText.split(' ms ·').length - 1 >= {n}", timeout=300_000)
            page.wait_for_timeout(500)  # let the last image paint
            Path(args.out).parent.mkdir(parents=True, exist_ok=True)
            page.screenshot(path=args.out, full_page=True)
            browser.close()
        print(f"{n} images after {time.time() - began:.1f} s; screenshot → {args.out}")
    finally:
        app.close()


if __name__ == "__main__":
    main()
