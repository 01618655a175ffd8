"""Take the README's screenshot of `consistency-lens serve`: the shipped lens on the embedded
model, a sentence with one token's popup open, in headless Chromium (Selenium, chromium-driver).
It lives beside the browser tests because it drives the page with their Chromium set-up.

Run: PYTHONPATH=. .venv/bin/python tests/serve/screenshot.py [docs/serve.png]
"""

from __future__ import annotations

import sys
import tempfile
import urllib.parse
from pathlib import Path

import torch

TEXT = "The president told Congress that the nation's economy was strong."


def main() -> None:
    """Serve the shipped lens on a free port, open one view by its permalink, save a PNG."""
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait
    from serving import chromium

    from consistency_lens.config import load_config
    from consistency_lens.serve.app import create_app, load_lenses
    from consistency_lens.serve.background import running

    out = Path(sys.argv[1] if len(sys.argv) > 1 else "docs/serve.png")
    torch.set_num_threads(1)
    app = create_app(load_lenses(load_config([], []), []))
    with tempfile.TemporaryDirectory() as profile, running(app) as base:
        driver = chromium("/usr/bin/chromium", "/usr/bin/chromedriver", Path(profile), (1100, 760))
        try:
            driver.get(f"{base}/?{urllib.parse.urlencode({'text': TEXT, 'pos': 3})}")
            wait = WebDriverWait(driver, 300)
            wait.until(lambda d: len(d.find_elements(By.CSS_SELECTOR, "#popup .sample")) == 3)
            out.parent.mkdir(parents=True, exist_ok=True)
            driver.save_screenshot(str(out))
        finally:
            driver.quit()
    print(f"screenshot: {out}")


if __name__ == "__main__":
    main()
