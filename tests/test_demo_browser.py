"""The Gradio demo in a real headless Chromium (Playwright): generate, compare, errors in the page, a queue of two.

The app is started once for the module on a free localhost port with the tiny model on the CPU. Skipped, with the
reason, only when no Chromium executable is found (``.ci/run`` installs Debian's ``chromium`` package).
"""
from __future__ import annotations

import shutil
import socket

import pytest
from playwright import sync_api  # the dev extra installs playwright, gradio and matplotlib

CHROMIUM_NAMES = ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable")
TIMEOUT_MS = 120_000


def _chromium() -> str:
    for name in CHROMIUM_NAMES:
        found = shutil.which(name) or shutil.which(name, path="/usr/bin")
        if found:
            return found
    pytest.skip(f"no Chromium found (looked for {', '.join(CHROMIUM_NAMES)} on PATH and in /usr/bin); .ci/run "
                "installs Debian's chromium package with apt-get")


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    from vidattn.demo.app import build_app

    blocks = build_app(device="cpu", out_dir=tmp_path_factory.mktemp("13-demo-videos"))
    port = _free_port()
    blocks.launch(server_name="127.0.0.1", server_port=port, prevent_thread_lock=True, ssr_mode=False, quiet=True)
    yield blocks, f"http://127.0.0.1:{port}/"
    blocks.close()


@pytest.fixture(scope="module")
def browser():
    executable = _chromium()
    with sync_api.sync_playwright() as play:
        chromium = play.chromium.launch(executable_path=executable, headless=True, args=["--no-sandbox"])
        yield chromium
        chromium.close()


def _open(browser, url):
    page = browser.new_page(viewport={"width": 1400, "height": 1800})
    page.set_default_timeout(TIMEOUT_MS)
    page.goto(url)
    page.wait_for_selector("#generate")
    return page


def _pick_method(page, name: str) -> None:
    page.locator("#method input").click()
    page.get_by_role("option", name=name, exact=True).click()
    page.wait_for_selector(f"#knob-{name}-block_size", state="visible")


def _set_number(page, elem_id: str, value: int) -> None:
    page.locator(f"#{elem_id} input").fill(str(value))


def _video_state(page, elem_id: str) -> dict:
    """The video element's source and whether the browser loaded its metadata (a playable source)."""
    page.wait_for_function(f"""() => {{
        const v = document.querySelector('#{elem_id} video');
        return v && v.currentSrc && v.readyState >= 1;
    }}""")
    return page.evaluate(f"""() => {{
        const v = document.querySelector('#{elem_id} video');
        return {{src: v.currentSrc, ready: v.readyState, error: v.error && v.error.code, duration: v.duration}};
    }}""")


def test_generate_radial_shows_video_density_and_mask(browser, server, tmp_path):
    page = _open(browser, server[1])
    _pick_method(page, "radial")
    page.click("#generate")
    state = _video_state(page, "video")
    assert state["src"].startswith("http") and state["error"] is None and state["duration"] > 0
    page.wait_for_selector("#stats:has-text('average attention density')")
    density = page.locator("#stats").inner_text()
    assert "radial" in density and "of dense" in density
    page.wait_for_selector("#mask img")
    size = page.evaluate("() => { const i = document.querySelector('#mask img'); return [i.naturalWidth, "
                         "i.naturalHeight]; }")
    assert size[0] >= 600 and size[1] >= 300
    page.wait_for_selector("#layers img")
    shot = tmp_path / "13-demo-generate.png"
    page.screenshot(path=str(shot), full_page=True)
    assert shot.stat().st_size > 10_000
    page.close()


def test_compare_shows_both_videos_and_psnr(browser, server, tmp_path):
    page = _open(browser, server[1])
    _pick_method(page, "rectified")
    page.click("#compare")
    for elem in ("dense-video", "method-video"):
        state = _video_state(page, elem)
        assert state["error"] is None and state["duration"] > 0
    page.wait_for_selector("#compare-stats:has-text('PSNR')")
    text = page.locator("#compare-stats").inner_text()
    assert "speedup" in text and "dB" in text and "SSIM" in text
    page.wait_for_selector("#difference img")
    page.screenshot(path=str(tmp_path / "13-demo-compare.png"), full_page=True)
    page.close()


def test_invalid_size_shows_message_not_traceback(browser, server):
    page = _open(browser, server[1])
    _set_number(page, "height", 63)
    page.click("#generate")
    message = page.get_by_text("Height: must be a positive multiple of 16")
    message.first.wait_for()
    assert "Traceback" not in page.content()
    page.close()


def test_two_requests_submitted_together_both_finish(browser, server):
    """A compare (two generations) and a generate from two pages: the second waits with its queue position shown,
    then both finish; the pipeline is not loaded again."""
    blocks = server[0]
    queued = {f.name: (f.queue, f.concurrency_limit, f.concurrency_id) for f in blocks.fns.values() if f.queue}
    assert queued == {"on_generate": (True, 1, "device"), "on_compare": (True, 1, "device")}
    loads = blocks.vidattn.pipelines.loads
    first, second = _open(browser, server[1]), _open(browser, server[1])
    _set_number(second, "seed", 5)
    first.click("#compare")
    first.wait_for_selector("#dense-video:has-text('denoising step')")
    second.click("#generate")
    second.wait_for_selector("#video:has-text('queue:')")
    first.wait_for_selector("#compare-stats:has-text('PSNR')")
    assert _video_state(second, "video")["error"] is None
    assert "average attention density" in second.locator("#stats").inner_text()
    for page in (first, second):
        assert not page.get_by_text("Error").count()
        page.close()
    assert blocks.vidattn.pipelines.loads == loads, "the pipeline is loaded once per model and reused"
