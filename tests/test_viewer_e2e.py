"""The web viewer end to end: dcmtk storescu -> iepnode serve -> headless Chromium.

A CT series whose slices differ is sent with dcmtk's ``storescu``, shared with
``iepnode transfer create`` (link and passcode from the node's outbox), and the
recipient signs in with Chromium (Playwright, ``/usr/bin/chromium``), clicks
**View** and must see: the first image drawn with exactly DICOM's window of the
stored values (canvas pixels compared with :func:`iepnode.viewing.pixel_values.window_linear`),
the next slice after an arrow key and the wheel, other pixels after a preset and
after a window/level drag. Screenshots go to ``tmp_path``.
"""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest
from playwright.sync_api import Page, expect, sync_playwright
from pydicom import dcmread

from iepnode.viewing.pixel_values import window_linear
from iepnode.viewing.rendering import decode_frame
from tests.support.chromium import CHROMIUM, CHROMIUM_ARGS, console_problem, require_chromium
from tests.support.node import running_node
from tests.support.scu import storescu
from tests.test_download import outbox_text
from tests.test_viewer_web import distinct_ct

SIZE = 32


def image_pixels(page: Page) -> np.ndarray:
    """The grey values of the viewer's full-resolution image canvas (red channel)."""
    values = page.evaluate("""() => {
        const c = document.getElementById('vw-image');
        const d = c.getContext('2d').getImageData(0, 0, c.width, c.height).data;
        const out = [];
        for (let i = 0; i < d.length; i += 4) out.push(d[i]);
        return [c.height, c.width, out];
    }""")
    rows, columns, flat = values
    return np.array(flat, dtype=np.uint8).reshape(rows, columns)


def wait_index(page: Page, index: int) -> None:
    """Wait until image ``index`` is drawn (a function, not a string: the page's CSP
    forbids eval, which Playwright would use to poll a string expression)."""
    page.wait_for_function(
        """(index) => window.iepViewer && window.iepViewer.index === index
            && window.iepViewer.shown === index""", arg=index)


def test_recipient_views_a_ct_in_chromium(tmp_path: Path,
                                          monkeypatch: pytest.MonkeyPatch) -> None:
    require_chromium()
    for name, value in {"INSTITUTION": "St Elsewhere", "FSYNC": "false"}.items():
        monkeypatch.setenv(f"IEPNODE_{name}", value)
    files = distinct_ct(tmp_path / "ct", 5, PatientName="Doe^Jane", PatientID="P1",
                        PatientBirthDate="19800214", StudyDate="20240105",
                        StudyDescription="CT HEAD", WindowCenter=40, WindowWidth=400)
    study_uid = str(dcmread(files[0]).StudyInstanceUID)
    expected = [decode_frame(path).values for path in files]  # slice i = instance i+1
    data_dir = tmp_path / "node"
    with running_node(data_dir, register=[("TESTSCU", "127.0.0.1", 0, "store")]) as node:
        sent = storescu(node, list(reversed(files)))
        assert sent.returncode == 0, sent.stderr
        public_id = node.cli("transfer", "create", "--study", study_uid, "--to",
                             "pat@example.org", "--otp-mobile", "+447700900123").stdout.strip()
        token = re.search(r"/t/([A-Za-z0-9_-]+)", outbox_text(data_dir, "pat@example.org"))
        base = f"http://127.0.0.1:{node.http_port}"
        with sync_playwright() as playwright:
            browser = playwright.chromium.launch(executable_path=str(CHROMIUM),
                                                 args=CHROMIUM_ARGS)
            try:
                page = browser.new_context(viewport={"width": 1100, "height": 800}).new_page()
                problems: list[str] = []
                page.on("console", lambda m: console_problem(m, problems))
                page.on("pageerror", lambda exc: problems.append(f"page error: {exc}"))
                page.on("response", lambda r: r.status >= 400 and problems.append(
                    f"HTTP {r.status} for {r.url}"))
                page.goto(f"{base}/t/{token.group(1)}")
                code = re.search(r"\b(\d{6})\b", outbox_text(data_dir, "sms:")).group(1)
                page.get_by_label("Passcode").fill(code)
                page.get_by_role("button", name="Sign in").click()
                page.wait_for_url("**/dashboard")
                page.goto(f"{base}/transactions/{public_id}")
                page.get_by_role("link", name="View", exact=True).click()
                page.wait_for_url(f"**/transactions/{public_id}/view")
                _look_and_scroll(page, expected, tmp_path)
                # A tablet in portrait (touch, 2x pixels): the same page, the image fitted.
                tablet = browser.new_context(viewport={"width": 768, "height": 1024},
                                             device_scale_factor=2, has_touch=True,
                                             storage_state=page.context.storage_state())
                pad = tablet.new_page()
                pad.goto(page.url)
                wait_index(pad, 0)
                np.testing.assert_array_equal(image_pixels(pad),
                                              window_linear(expected[0], 40, 400))
                pad.screenshot(path=str(tmp_path / "viewer-tablet.png"))
                # The test's own getImageData readbacks make Chromium suggest a flag.
                assert [p for p in problems if "willReadFrequently" not in p] == []
            finally:
                browser.close()


def _look_and_scroll(page: Page, expected: list[np.ndarray], shots: Path) -> None:
    expect(page.locator(".vw-banner")).to_have_text("Review only. Not for diagnostic use.")
    wait_index(page, 0)  # the first image, drawn with the file's window 40/400
    np.testing.assert_array_equal(image_pixels(page), window_linear(expected[0], 40, 400))
    expect(page.locator("#vw-tl")).to_contain_text("DOE, Jane")
    expect(page.locator("#vw-tl")).to_contain_text("P1")
    expect(page.locator("#vw-bl")).to_contain_text("Image 1 / 5")
    expect(page.locator("#vw-br")).to_contain_text("W 400  L 40")
    expect(page.locator(".vw-series button")).to_have_count(1)
    page.screenshot(path=str(shots / "viewer.png"))

    stage = page.locator("#vw-stage")
    stage.focus()
    page.keyboard.press("ArrowDown")
    wait_index(page, 1)
    np.testing.assert_array_equal(image_pixels(page), window_linear(expected[1], 40, 400))
    box = stage.bounding_box()
    page.mouse.move(box["x"] + box["width"] / 2, box["y"] + box["height"] / 2)
    page.mouse.wheel(0, 120)
    wait_index(page, 2)
    np.testing.assert_array_equal(image_pixels(page), window_linear(expected[2], 40, 400))
    expect(page.locator("#vw-bl")).to_contain_text("Image 3 / 5")

    page.get_by_role("button", name="Bone").click()
    assert page.evaluate("window.iepViewer.window") == {"center": 300, "width": 2000}
    bone = image_pixels(page)
    np.testing.assert_array_equal(bone, window_linear(expected[2], 300, 2000))

    x, y = box["x"] + box["width"] / 2, box["y"] + box["height"] / 2
    page.mouse.move(x, y)
    page.mouse.down()
    page.mouse.move(x - 60, y + 40, steps=4)
    page.mouse.up()
    window = page.evaluate("window.iepViewer.window")
    assert window != {"center": 300, "width": 2000}
    dragged = image_pixels(page)
    assert not np.array_equal(dragged, bone)
    np.testing.assert_array_equal(dragged, window_linear(expected[2], window["center"],
                                                         window["width"]))
    page.screenshot(path=str(shots / "viewer-bone-dragged.png"))
