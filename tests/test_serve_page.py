"""Pages in a real headless Chromium: the server's page (layout at phone and desktop widths, an upload
that shows the top-5 bars of offline predict) and the eval report (reliability diagram and error gallery).

Chromium comes from the Makefile (Debian's `chromium` + `chromium-driver`); without it these tests skip
and say why.
"""

from __future__ import annotations

import shutil
import tempfile

import pytest

from support.serve import png_bytes, running_server
from toolkit.evaluate import predict

pytestmark = [pytest.mark.slow, pytest.mark.browser]

WIDTHS = (400, 1000, 1400)


@pytest.fixture(scope="session")
def browser():
    chromium, driver_path = shutil.which("chromium"), shutil.which("chromedriver")
    if not (chromium and driver_path):
        pytest.skip("chromium and chromedriver are not installed (apt-get install chromium chromium-driver)")
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


def set_viewport(driver, width: int, height: int = 900) -> None:
    driver.execute_cdp_cmd("Emulation.setDeviceMetricsOverride",
                           {"width": width, "height": height, "deviceScaleFactor": 1, "mobile": width < 600})


BOXES = """
const box = e => { const r = e.getBoundingClientRect(); return {left: r.left, right: r.right, top: r.top,
  bottom: r.bottom, width: r.width, height: r.height}; };
const main = document.querySelector("main"), style = getComputedStyle(main);
const m = box(main);
return {main: {left: m.left + parseFloat(style.paddingLeft), right: m.right - parseFloat(style.paddingRight)},
        title: box(document.querySelector("h1")), model: box(document.getElementById("model")),
        drop: box(document.getElementById("drop")), viewport: window.innerWidth,
        scroll: document.documentElement.scrollWidth,
        titleClipped: [...document.querySelectorAll("h1, #model")].some(e => e.scrollWidth > e.clientWidth)};
"""


def overlaps(a: dict, b: dict) -> bool:
    across = a["left"] < b["right"] and b["left"] < a["right"]
    return across and a["top"] < b["bottom"] and b["top"] < a["bottom"]


def assert_layout(driver, width: int) -> None:
    boxes = driver.execute_script(BOXES)
    assert boxes["viewport"] == width
    drop, column = boxes["drop"], boxes["main"]
    # The drop zone is a block spanning the main column (it once was an 18-px inline strip over the title).
    spans = abs(drop["left"] - column["left"]) <= 1 and abs(drop["right"] - column["right"]) <= 1
    assert spans, (width, boxes)
    assert drop["height"] >= 80, (width, boxes)
    for name in ("title", "model"):
        assert not overlaps(drop, boxes[name]), (width, name, boxes)
    assert drop["top"] >= boxes["model"]["bottom"] and not boxes["titleClipped"], (width, boxes)
    assert boxes["scroll"] <= width, (width, boxes)  # nothing sticks out sideways at phone width


def test_page_shows_top5_matching_offline_predict(browser, sample_onnx_fp32, sample_test, tmp_path):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support import expected_conditions as ec
    from selenium.webdriver.support.ui import WebDriverWait

    from toolkit.runtime.registry import open_model

    image_path = tmp_path / "digit.png"
    image_path.write_bytes(png_bytes(sample_test.images[5]))
    with open_model(sample_onnx_fp32) as runner, running_server(runner) as (base, _):
        offline = predict(runner, [str(image_path)], top_k=5)[0]["top"]
        for width in WIDTHS:
            set_viewport(browser, width)
            browser.get(base + "/")
            WebDriverWait(browser, 10).until(lambda d: "(" in d.find_element(By.ID, "model").text)
            assert_layout(browser, width)
        set_viewport(browser, 400)
        browser.find_element(By.ID, "file").send_keys(str(image_path))
        WebDriverWait(browser, 20).until(ec.presence_of_element_located((By.CSS_SELECTOR, "#top .row")))
        rows = browser.find_elements(By.CSS_SELECTOR, "#top .row")
        assert len(rows) == 5
        assert [int(r.get_attribute("data-index")) for r in rows] == [t["index"] for t in offline]
        assert rows[0].get_attribute("data-class") == offline[0]["class"]
        WebDriverWait(browser, 5).until(lambda d: d.find_element(
            By.CSS_SELECTOR, "#top .row .bar").value_of_css_property("width") not in ("0px", "auto"))
        assert "%" in rows[0].text
        assert_layout(browser, 400)  # the results under it do not disturb the layout
        rows_box = browser.execute_script(
            "return [...document.querySelectorAll('#top .row')].map(r => r.getBoundingClientRect().right)")
        assert max(rows_box) <= 400


def test_eval_report_shows_reliability_diagram_and_gallery(browser, sample_model, tmp_path):
    from selenium.webdriver.common.by import By

    from support.cli import invoke

    result = invoke("eval", "-m", sample_model, "--dataset", "sample", "--output-dir", tmp_path / "report")
    assert result.exit_code == 0, result.output
    set_viewport(browser, 1000)
    browser.get((tmp_path / "report" / "report.html").as_uri())
    loaded = "return arguments[0].complete && arguments[0].naturalWidth > 0 && arguments[0].offsetHeight > 0"
    diagram = browser.find_element(By.CSS_SELECTOR, 'img[alt="reliability diagram"]')
    assert browser.execute_script(loaded, diagram)
    thumbs = browser.find_elements(By.CSS_SELECTOR, ".gallery .thumb img")
    wrong = sum(1 for line in (tmp_path / "report" / "errors.csv").read_text().splitlines()[1:])
    assert len(thumbs) == min(wrong, 64) >= 1
    assert all(browser.execute_script(loaded, img) for img in thumbs)
    assert "predicted" in browser.find_element(By.CSS_SELECTOR, ".gallery").text
    browser.save_screenshot(str(tmp_path / "report.png"))


def test_page_lets_a_person_pick_the_model(browser, sample_onnx_fp32, sample_onnx_int8, sample_test,
                                           tmp_path):
    """Two models served: the page offers both and classifies with the one picked (/predict?model=NAME)."""
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import Select, WebDriverWait

    from serve.repository import FileModels, ModelSettings
    from toolkit.engines import RunnerSpec

    image_path = tmp_path / "digit.png"
    image_path.write_bytes(png_bytes(sample_test.images[3]))
    source = FileModels({"fp32": RunnerSpec(str(sample_onnx_fp32)),
                         "int8": RunnerSpec(str(sample_onnx_int8))}, ModelSettings())
    with running_server(source) as (base, _):
        set_viewport(browser, 1000)
        browser.get(base + "/")
        WebDriverWait(browser, 10).until(lambda d: d.find_elements(By.ID, "models"))
        picker = Select(browser.find_element(By.ID, "models"))
        assert [o.text for o in picker.options] == ["fp32", "int8"]
        assert_layout(browser, 1000)
        picker.select_by_visible_text("int8")
        browser.find_element(By.ID, "file").send_keys(str(image_path))
        WebDriverWait(browser, 20).until(lambda d: d.find_elements(By.CSS_SELECTOR, "#top .row"))
        assert browser.find_element(By.ID, "top").get_attribute("data-model") == "int8"
