"""The page in a real headless Chromium: upload a digit, wait for the top-5 bars, compare with offline predict."""

from __future__ import annotations

import shutil
import subprocess
import tempfile

import pytest

from test_serve_support import png_bytes, running_server
from toolkit.evaluate import predict

pytestmark = [pytest.mark.slow, pytest.mark.browser]


def _ensure_chromium() -> tuple[str, str]:
    """Debian's chromium + chromium-driver, installed once if missing; skip with the reason otherwise."""
    if not (shutil.which("chromium") and shutil.which("chromedriver")):
        if not shutil.which("apt-get"):
            pytest.skip("chromium is not installed and apt-get is not available to install it")
        try:
            for command in (["apt-get", "update", "-qq"],
                            ["apt-get", "install", "-y", "-qq", "chromium", "chromium-driver"]):
                subprocess.run(command, check=True, capture_output=True, timeout=300,
                               env={"DEBIAN_FRONTEND": "noninteractive", "PATH": "/usr/sbin:/usr/bin:/sbin:/bin"})
        except (subprocess.SubprocessError, OSError) as exc:
            pytest.skip(f"cannot install chromium with apt-get: {exc}")
    chromium, driver = shutil.which("chromium"), shutil.which("chromedriver")
    if not (chromium and driver):
        pytest.skip("chromium or chromedriver still missing after apt-get install")
    return chromium, driver


@pytest.fixture(scope="session")
def browser():
    chromium, driver_path = _ensure_chromium()
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    profile = tempfile.mkdtemp(prefix="toolkit-chromium-")
    options = webdriver.ChromeOptions()
    options.binary_location = chromium
    for flag in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-dev-shm-usage", f"--user-data-dir={profile}"):
        options.add_argument(flag)
    try:
        driver = webdriver.Chrome(service=Service(driver_path), options=options)
    except Exception as exc:  # noqa: BLE001 - a browser that cannot start is a skip, not a failure
        shutil.rmtree(profile, ignore_errors=True)
        pytest.skip(f"headless chromium does not start here: {exc}")
    yield driver
    driver.quit()
    shutil.rmtree(profile, ignore_errors=True)


def test_page_shows_top5_matching_offline_predict(browser, sample_onnx_fp32, sample_test, tmp_path):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support import expected_conditions as ec
    from selenium.webdriver.support.ui import WebDriverWait

    from toolkit.runtime.registry import open_model

    image_path = tmp_path / "digit.png"
    image_path.write_bytes(png_bytes(sample_test.images[5]))
    with open_model(sample_onnx_fp32) as runner, running_server(runner) as (base, _):
        offline = predict(runner, [str(image_path)], top_k=5)[0]["top"]
        browser.get(base + "/")
        browser.find_element(By.ID, "file").send_keys(str(image_path))
        WebDriverWait(browser, 20).until(ec.presence_of_element_located((By.CSS_SELECTOR, "#top .row")))
        rows = browser.find_elements(By.CSS_SELECTOR, "#top .row")
        assert len(rows) == 5
        assert [int(r.get_attribute("data-index")) for r in rows] == [t["index"] for t in offline]
        assert rows[0].get_attribute("data-class") == offline[0]["class"]
        WebDriverWait(browser, 5).until(lambda d: d.find_element(By.CSS_SELECTOR, "#top .row .bar").value_of_css_property(
            "width") not in ("0px", "auto"))
        assert "%" in rows[0].text
