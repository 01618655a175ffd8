"""The viewer page driven as a user would, in Debian's headless Chromium through Selenium (with
`chromium-driver`, both installed by `apt-get` the first time): type a sentence, hover a token and
read the popup, switch lens, compare two lenses, open the permalink."""

from __future__ import annotations

import os
import shutil
import subprocess

import pytest
from serving import chromium, tiny_lenses

from consistency_lens.serve.app import create_app, load_lenses
from consistency_lens.serve.background import running

SENTENCE = "the nation economy congress people"


def _installed() -> tuple[str, str]:
    """Paths of chromium and chromedriver, installed with apt-get when missing (else a skip)."""
    names = {"chromium": ("chromium", "chromium-browser"), "chromedriver": ("chromedriver",)}

    def find() -> dict[str, str | None]:
        return {k: next(filter(None, map(shutil.which, v)), None) for k, v in names.items()}

    found = find()
    if None in found.values():
        env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
        try:
            subprocess.run(
                ["apt-get", "update"], check=True, capture_output=True, timeout=600, env=env
            )
            subprocess.run(
                ["apt-get", "install", "-y", "chromium", "chromium-driver"],
                check=True,
                capture_output=True,
                timeout=900,
                env=env,
            )
        except (OSError, subprocess.SubprocessError) as err:
            pytest.skip(f"`apt-get install chromium chromium-driver` failed: {err}")
        found = find()
    if None in found.values():
        pytest.skip("`apt-get install chromium chromium-driver` ran but a binary is missing")
    return found["chromium"], found["chromedriver"]


@pytest.fixture(scope="module")
def browser(tmp_path_factory):
    """A headless Chromium under Selenium, offline, with a fresh profile."""
    binary, driver_path = _installed()
    driver = chromium(binary, driver_path, tmp_path_factory.mktemp("profile"), (1280, 900))
    yield driver
    driver.quit()


@pytest.fixture(scope="module")
def site(tmp_path_factory, tiny_llama_dir):
    """The viewer on two tiny lenses, on a free 127.0.0.1 port; yields (base URL, lenses)."""
    cfg, paths = tiny_lenses(tmp_path_factory.mktemp("lenses"), tiny_llama_dir)
    lenses = load_lenses(cfg, paths)
    with running(create_app(lenses)) as base:
        yield base, lenses


def _wait(driver, condition, timeout: float = 60):
    """Poll `condition` until truthy; an element the page re-rendered meanwhile is polled again."""
    from selenium.common.exceptions import StaleElementReferenceException
    from selenium.webdriver.support.ui import WebDriverWait

    wait = WebDriverWait(driver, timeout, ignored_exceptions=(StaleElementReferenceException,))
    return wait.until(condition)


def test_type_hover_switch_compare_and_permalink(browser, site):
    import httpx
    from selenium.webdriver.common.action_chains import ActionChains
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import Select

    base, _ = site
    expected = {
        name: httpx.post(f"{base}/api/explain", json={"text": SENTENCE, "lens": name}).json()[
            "rows"
        ]
        for name in ("alpha", "beta")
    }
    browser.get(base + "/")
    _wait(browser, lambda d: len(d.find_elements(By.CSS_SELECTOR, "#lens option")) == 2)
    box = browser.find_element(By.ID, "text")
    box.clear()
    box.send_keys(SENTENCE)
    browser.find_element(By.ID, "go").click()
    tokens = _wait(browser, lambda d: d.find_elements(By.CSS_SELECTOR, ".pane .tok"))
    assert "".join(t.get_attribute("textContent") for t in tokens) == SENTENCE
    assert len(tokens) == len(expected["alpha"])

    # Hover the third token: the popup shows the context with P marked, the greedy explanation,
    # KL, both top-5 lists, and (once they come) three sampled explanations.
    ActionChains(browser).move_to_element(tokens[2]).perform()
    popup = _wait(
        browser,
        lambda d: d.find_element(By.ID, "popup").is_displayed() and d.find_element(By.ID, "popup"),
    )
    row = expected["alpha"][2]
    assert popup.find_element(By.CSS_SELECTOR, "mark").text.strip() == row["token"].strip()
    greedy = popup.find_element(By.CSS_SELECTOR, ".greedy").get_attribute("textContent")
    assert greedy == f'"{row["explanation"]}"' or greedy.strip('"') == row["explanation"]
    assert f"KL {row['kl']:.3f}" in popup.text
    models = [
        c.get_attribute("textContent") for c in popup.find_elements(By.CSS_SELECTOR, ".top-model")
    ]
    assert len(models) == 5 and models[0].strip('"') == row["top_model"][0][0]
    _wait(browser, lambda d: len(d.find_elements(By.CSS_SELECTOR, "#popup .sample")) == 3)

    # Switch lens: the page explains the text again with beta.
    Select(browser.find_element(By.ID, "lens")).select_by_visible_text("beta")
    _wait(browser, lambda d: d.find_element(By.CSS_SELECTOR, ".pane h2").text.startswith("beta"))
    tokens = browser.find_elements(By.CSS_SELECTOR, ".pane .tok")
    tokens[2].click()  # click pins the popup and the position
    popup = _wait(
        browser,
        lambda d: d.find_element(By.ID, "popup").is_displayed() and d.find_element(By.ID, "popup"),
    )
    greedy = popup.find_element(By.CSS_SELECTOR, ".greedy").get_attribute("textContent")
    assert greedy.strip('"') == expected["beta"][2]["explanation"]

    # Side by side: two panes, and the popup holds both lenses at the same position.
    Select(browser.find_element(By.ID, "compare")).select_by_visible_text("alpha")
    _wait(browser, lambda d: len(d.find_elements(By.CSS_SELECTOR, ".pane")) == 2)
    _wait(browser, lambda d: len(d.find_elements(By.CSS_SELECTOR, "#popup .lens-block")) == 2)
    blocks = browser.find_elements(By.CSS_SELECTOR, "#popup .lens-block")
    assert [b.get_attribute("data-lens") for b in blocks] == ["beta", "alpha"]

    # The permalink reproduces the view (text, lenses, position) in a fresh page load.
    link = browser.find_element(By.ID, "permalink").get_attribute("href")
    assert "pos=" in link and "lens=beta" in link and "compare=alpha" in link
    browser.get("about:blank")
    browser.get(link)
    _wait(browser, lambda d: len(d.find_elements(By.CSS_SELECTOR, "#popup .lens-block")) == 2)
    assert browser.find_element(By.ID, "text").get_attribute("value") == SENTENCE
    pos = expected["beta"][2]["position"]
    assert browser.find_element(By.CSS_SELECTOR, "#popup h3").text == f"beta · position {pos}"

    # Offline: every resource the page loaded came from the server itself.
    urls = browser.execute_script(
        "return performance.getEntriesByType('resource').map(e => e.name)"
    )
    assert urls and all(u.startswith(base) for u in urls)


def test_an_error_is_shown_in_one_sentence(browser, site):
    from selenium.webdriver.common.by import By

    base, _ = site
    browser.get(base + "/?text=&lens=alpha")
    status = _wait(browser, lambda d: d.find_element(By.CSS_SELECTOR, "#status.error"))
    assert "empty" in status.text
