"""The web demo in a real browser: started on 127.0.0.1, driven by headless Chromium (selenium +
Debian's chromium / chromium-driver): upload an image, ask, and find the model's answer on the page.

``MAMBAVLM_DEMO_MODEL=DIR`` runs it with a saved model (the README's screenshot: the offline default's
trained model, ``MAMBAVLM_DEMO_SCREENSHOT=docs/demo.png``)."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
from mambavlm.data.synthetic import make_shapes_vqa
from mambavlm.vision.image import open_image
from tests.conftest import ROOT, subprocess_env, tiny_vlm

pytest.importorskip("gradio")
webdriver = pytest.importorskip("selenium.webdriver")
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
CHROMEDRIVER = shutil.which("chromedriver")
pytestmark = [
    pytest.mark.skipif(CHROMIUM is None or CHROMEDRIVER is None, reason="needs chromium and chromium-driver"),
    pytest.mark.usefixtures("on_cpu"),
]
SCREENSHOT_ENV = "MAMBAVLM_DEMO_SCREENSHOT"
"""Where the test saves a screenshot of the answered page (the README's), when set."""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for(url: str, process: subprocess.Popen, seconds: float) -> None:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise AssertionError(f"the demo exited: {process.stdout.read()[-3000:]}")
        try:
            with urllib.request.urlopen(url, timeout=2):
                return
        except OSError:
            time.sleep(0.5)
    raise AssertionError(f"the demo did not answer on {url} within {seconds} s")


def test_demo_answers_an_uploaded_image_in_headless_chromium(tmp_path: Path) -> None:
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support import expected_conditions as ec
    from selenium.webdriver.support.ui import WebDriverWait

    model_dir = Path(os.environ.get("MAMBAVLM_DEMO_MODEL", tmp_path / "model"))
    if not model_dir.exists():
        tiny_vlm().save_pretrained(model_dir)
    from mambavlm.model import MambaVLM

    model = MambaVLM.from_pretrained(model_dir).eval()
    _, val_json = make_shapes_vqa(tmp_path / "shapes", num_train=0, num_val=1, image_size=64)
    record = json.loads(val_json.read_text())[0]
    image_path = tmp_path / "shapes" / record["image"]
    question = record["conversations"][0]["value"].replace("<image>", "").strip()
    expected = model.answer([open_image(image_path)], [question], max_new_tokens=8, fast=False)[0]
    assert expected.strip(), "an empty answer would be found on any page"

    port = free_port()
    demo = subprocess.Popen(
        [sys.executable, "-m", "mambavlm.demo", "--model", str(model_dir), "--port", str(port), "--device", "cpu",
         "--max-new-tokens", "8"],
        cwd=ROOT, env=subprocess_env(GRADIO_ANALYTICS_ENABLED="False"), stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT, text=True,
    )
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--window-size=1280,900"):
        options.add_argument(flag)
    browser = None
    try:
        wait_for(f"http://127.0.0.1:{port}/", demo, 120)
        browser = webdriver.Chrome(service=webdriver.ChromeService(CHROMEDRIVER), options=options)
        browser.get(f"http://127.0.0.1:{port}/")
        wait = WebDriverWait(browser, 60)
        upload = wait.until(ec.presence_of_element_located((By.CSS_SELECTOR, "#image input[type=file]")))
        upload.send_keys(str(image_path))
        wait.until(ec.presence_of_element_located((By.CSS_SELECTOR, "#image img")))
        box = wait.until(ec.element_to_be_clickable((By.CSS_SELECTOR, "#question textarea")))
        box.send_keys(question)
        browser.find_element(By.CSS_SELECTOR, "#ask").click()
        wait.until(lambda b: question in b.find_element(By.ID, "chatbot").text)
        wait.until(lambda b: expected in b.find_element(By.ID, "chatbot").text.split(question, 1)[-1])
        if os.environ.get(SCREENSHOT_ENV):
            time.sleep(1)
            browser.save_screenshot(os.environ[SCREENSHOT_ENV])
    finally:
        if browser is not None:
            browser.quit()
        demo.terminate()
        demo.wait(timeout=30)
