"""The web page end to end: headless Chromium (Debian's ``chromium``, driven by Playwright)
against real ``easel serve`` processes, one with the mock backend and one with the tiny
diffusers pipeline. One browser for the module; each test opens its own contexts.

Screenshots (phone and desktop) land in ``$EASEL_SCREENSHOTS`` (default: a temporary
directory, printed in the test output), to be looked at by a person.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from websockets.sync.client import connect

from tests.servers import Process, easel_serve, serve

pytestmark = pytest.mark.slow

CHROMIUM = os.environ.get("EASEL_CHROMIUM", "/usr/bin/chromium")
ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
        "--no-first-run"]  # fmt: skip
DESKTOP = {"width": 1280, "height": 860}
PHONE = {"width": 390, "height": 844}
WAIT_MS = 60_000  # a generous bound for a busy 2-core machine; normally a second or two


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    if not Path(CHROMIUM).exists() and shutil.which("chromium") is None:
        if os.environ.get("CI"):
            pytest.fail("chromium is not installed; .ci/run installs it")
        pytest.skip("chromium is not installed (apt-get install chromium)")
    playwright_api = pytest.importorskip("playwright.sync_api")
    with playwright_api.sync_playwright() as playwright:
        launched = playwright.chromium.launch(executable_path=CHROMIUM, args=ARGS)
        yield launched
        launched.close()


@pytest.fixture(scope="module")
def shots() -> Path:
    where = os.environ.get("EASEL_SCREENSHOTS")
    path = Path(where) if where else Path(tempfile.gettempdir()) / "easel-screenshots"
    path.mkdir(parents=True, exist_ok=True)
    print(f"screenshots in {path}")
    return path


@pytest.fixture(scope="module")
def mock_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Process]:
    """The mock backend at 100 ms a step: a 150-step job holds the only worker 15 s."""
    root = tmp_path_factory.mktemp("ui-mock")
    env = {"EASEL_MOCK_STEP_DELAY": "0.1"}
    with easel_serve(root / "data", "--backend", "mock", env=env) as process:
        yield process


@pytest.fixture(scope="module")
def tiny_server(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """The app ``easel serve --backend diffusers --model DIR`` runs, on uvicorn in this
    process: torch and diffusers are imported once (the tiny pipeline's fixture did)."""
    from easel.api import create_app
    from easel.config import Settings

    root = tmp_path_factory.mktemp("ui-tiny")
    settings = Settings(
        data_dir=root / "data", backend="diffusers", model=str(tiny_model_dir), device="cpu"
    )
    with serve(create_app(settings)) as url:
        yield url


def submit(url: str, **fields: Any) -> dict[str, Any]:
    body = {"width": 64, "height": 64, "steps": 4, **fields}
    response = httpx.post(f"{url}/v1/jobs", json=body)
    assert response.status_code == 202, response.text
    job: dict[str, Any] = response.json()
    return job


def state_of(url: str, job_id: str) -> str:
    state: str = httpx.get(f"{url}/v1/jobs/{job_id}").json()["state"]
    return state


def block(url: str, steps: int = 150) -> str:
    """Occupy the only worker; the caller cancels it. Returns once the job runs."""
    job_id = str(submit(url, prompt="blocker", user_id="blocker", steps=steps)["id"])
    with connect(f"{url.replace('http', 'ws')}/v1/events?job_id={job_id}") as ws:
        while json.loads(ws.recv(timeout=60))["type"] != "started":
            pass
    return job_id


def clear(url: str, *users: str) -> None:
    for user in users:
        httpx.delete(f"{url}/v1/jobs", params={"user_id": user})


def open_page(browser: Any, url: str, user: str, viewport: dict[str, int] = DESKTOP) -> Any:
    """A fresh browser context (its own localStorage) with the page open as ``user``."""
    context = browser.new_context(viewport=viewport)
    page = context.new_page()
    page.set_default_timeout(WAIT_MS)
    errors: list[str] = []
    page.on("pageerror", lambda error: errors.append(str(error)))
    page.errors = errors
    page.goto(url)
    page.fill("#user", user)
    page.press("#user", "Tab")  # change event: the page reattaches as this user
    page.wait_for_selector("body[data-ready=true]")
    return page


def generate(page: Any, prompt: str, *, steps: int = 4, size: str = "64x64") -> str:
    """Submit through the form; returns the new job's id once its card is shown."""
    before = set(page.eval_on_selector_all("#my-jobs .job", "els => els.map(e => e.dataset.id)"))
    page.fill("#prompt", prompt)
    page.select_option("#size", size)
    page.fill("#steps", str(steps))
    page.click("#submit")
    page.wait_for_function(
        "n => document.querySelectorAll('#my-jobs .job').length > n", arg=len(before)
    )
    ids = page.eval_on_selector_all("#my-jobs .job", "els => els.map(e => e.dataset.id)")
    (new,) = set(ids) - before
    return str(new)


def card(job_id: str) -> str:
    return f'#my-jobs .job[data-id="{job_id}"]'


@pytest.mark.timeout(300)  # with building the tiny pipeline; ~20 s on an idle 2-core machine
def test_submit_then_position_previews_and_image(
    browser: Any, tiny_server: str, shots: Path
) -> None:
    """The tiny diffusers pipeline: queued with a position, then previews, then the image."""
    url = tiny_server
    page = open_page(browser, url, "ada")
    blocker = block(url)
    job_id = generate(page, "a lighthouse at dusk", steps=12, size="128x128")
    status = page.locator(f"{card(job_id)} .status")
    status.filter(has_text="next in line").wait_for()
    page.screenshot(path=shots / "desktop-queued.png", full_page=True)
    httpx.delete(f"{url}/v1/jobs/{blocker}")
    page.wait_for_selector(f"{card(job_id)}[data-previews]:not([data-previews='0'])")
    page.wait_for_selector(f"{card(job_id)}[data-state=succeeded] img.result")
    page.wait_for_function(
        "sel => { const i = document.querySelector(sel); return i && i.naturalWidth === 128; }",
        arg=f"{card(job_id)} img.result",
    )
    assert "Done" in status.inner_text()
    page.screenshot(path=shots / "desktop-done.png", full_page=True)
    assert page.errors == []
    page.context.close()


def test_reload_mid_run_keeps_following(browser: Any, mock_server: Process) -> None:
    url = mock_server.url
    page = open_page(browser, url, "grace")
    job_id = generate(page, "a slow one", steps=30)  # 3 s on the mock
    page.locator(f"{card(job_id)} .status").filter(has_text="step").wait_for()
    page.reload()
    page.wait_for_selector("body[data-ready=true]")
    status = page.locator(f"{card(job_id)} .status")  # reattached from the API
    status.filter(has_text="step").wait_for()
    page.wait_for_selector(f"{card(job_id)}[data-state=succeeded] img.result")
    # run it again with the same seed: a new card, the same seed
    seed = httpx.get(f"{url}/v1/jobs/{job_id}").json()["request"]["seed"]
    before = page.locator("#my-jobs .job").count()
    page.get_by_role("button", name='Run "a slow one" again with the same seed').first.click()
    page.wait_for_function("n => document.querySelectorAll('#my-jobs .job').length > n", arg=before)
    again = page.eval_on_selector("#my-jobs .job", "e => e.dataset.id")
    assert again != job_id
    assert httpx.get(f"{url}/v1/jobs/{again}").json()["request"]["seed"] == seed
    # a second tab of the same person follows the same queue
    other = page.context.new_page()
    other.goto(url)
    other.wait_for_selector(f"{card(job_id)}[data-state=succeeded]")
    assert page.errors == []
    page.context.close()


def test_two_users_see_and_cancel_only_their_own(
    browser: Any, mock_server: Process, shots: Path
) -> None:
    url = mock_server.url
    alice = open_page(browser, url, "alice")
    bob = open_page(browser, url, "bob", viewport=PHONE)
    block(url)
    try:
        mine = generate(alice, "alice's red fox")
        theirs = generate(bob, "bob's blue bird")
        alice.locator(f"{card(mine)} .status").filter(has_text="Queued").wait_for()
        bob.locator(f"{card(theirs)} .status").filter(has_text="Queued").wait_for()
        bob.screenshot(path=shots / "phone-queue.png", full_page=True)
        assert alice.locator(card(theirs)).count() == 0
        assert bob.locator(card(mine)).count() == 0
        assert alice.locator("#my-jobs").inner_text().count("bob's") == 0
        alice.get_by_role("button", name='Cancel "alice\'s red fox"').click()
        alice.wait_for_selector(f"{card(mine)}[data-state=cancelled]")
        assert alice.locator(f"{card(mine)} button.danger").count() == 0
        assert state_of(url, theirs) == "queued"
        assert bob.locator(f"{card(theirs)}[data-state=queued]").count() == 1
    finally:
        clear(url, "alice", "bob", "blocker")
    bob.wait_for_selector(f"{card(theirs)}[data-state=cancelled]")
    assert alice.errors == [] and bob.errors == []
    alice.context.close()
    bob.context.close()


def test_gallery_shows_parameters_and_reuses_them(
    browser: Any, mock_server: Process, shots: Path
) -> None:
    url = mock_server.url
    done = submit(url, prompt="an owl in the snow", user_id="hopper", seed=4242, steps=3)
    submit(url, prompt="a cat on a mat", user_id="hopper", steps=2)
    page = open_page(browser, url, "hopper")
    page.wait_for_selector(f"{card(done['id'])}[data-state=succeeded]")
    page.click("#tab-gallery")
    page.fill("#g-q", "OWL")
    page.click("#gallery-filter button[type=submit]")
    tiles = page.locator("#gallery-grid .tile")
    tiles.filter(has_text="an owl in the snow").wait_for()
    page.wait_for_function("() => document.querySelectorAll('#gallery-grid .tile').length === 1")
    tiles.first.click()
    info = page.locator("#detail-info")
    page.wait_for_function("() => document.querySelector('#detail-info').value.includes('Version')")
    text = info.input_value()  # the PNG's own infotext
    assert text.startswith("an owl in the snow")
    assert "Seed: 4242" in text and "Steps: 3" in text and "Size: 64x64" in text
    page.screenshot(path=shots / "desktop-gallery-detail.png")
    page.click("#detail-use")
    assert page.input_value("#prompt") == "an owl in the snow"
    assert page.input_value("#seed") == "4242" and page.input_value("#steps") == "3"
    assert page.locator("#create").is_visible()
    phone = page.context.new_page()
    phone.set_viewport_size(PHONE)
    phone.goto(f"{url}/#gallery")
    phone.locator("#gallery-grid .tile").first.wait_for()
    phone.screenshot(path=shots / "phone-gallery.png", full_page=True)
    assert page.errors == []
    page.context.close()


def test_operator_lists_backends_and_moves_a_job(
    browser: Any, mock_server: Process, shots: Path
) -> None:
    url = mock_server.url
    blocker = block(url)
    try:
        first = submit(url, prompt="first", user_id="u1")
        submit(url, prompt="second", user_id="u2")
        last = submit(url, prompt="third", user_id="u3")
        assert httpx.get(f"{url}/v1/jobs/{last['id']}").json()["position"] == 2
        page = open_page(browser, url, "u3")
        page.click("#tab-operator")
        page.locator("#op-backends li").filter(has_text="mock").wait_for()
        rows = page.locator("#op-line tbody tr")
        page.wait_for_selector(f'#op-line tr[data-id="{last["id"]}"]')
        assert rows.count() == 4  # the running blocker and three queued
        running = page.locator(f'#op-line tr[data-id="{blocker}"]')
        assert "running" in running.inner_text()
        # only the viewer's own prompt shows (no admin token)
        assert "third" in page.locator(f'#op-line tr[data-id="{last["id"]}"]').inner_text()
        assert "hidden" in page.locator(f'#op-line tr[data-id="{first["id"]}"]').inner_text()
        page.screenshot(path=shots / "desktop-operator.png", full_page=True)
        page.get_by_role("button", name=f"Move u3's job {last['id'][-6:]} to the front").click()
        page.locator("#notice").filter(has_text="Moved").wait_for()
        assert httpx.get(f"{url}/v1/jobs/{last['id']}").json()["position"] == 0
        page.get_by_role("button", name=f"Move u1's job {first['id'][-6:]} to the back").click()
        page.wait_for_function(
            "id => document.querySelector(`#op-line tr[data-id='${id}'] td`)?.textContent === '3'",
            arg=first["id"],
        )
        assert httpx.get(f"{url}/v1/jobs/{first['id']}").json()["position"] == 2
        page.set_viewport_size(PHONE)
        page.screenshot(path=shots / "phone-operator.png", full_page=True)
        assert page.errors == []
        page.context.close()
    finally:
        clear(url, "u1", "u2", "u3", "blocker")


def test_audio_results_play_on_the_page(browser: Any, tmp_path: Path) -> None:
    """A speech job of the user's (sent by another client) shows as a player that loads
    its clip: the browser decodes the WAV and knows its length."""
    from easel.api import create_app
    from easel.backends.mock import MockAudioBackend, MockBackend
    from easel.config import Settings
    from easel.runtime.facade import Runtime

    settings = Settings(data_dir=tmp_path / "data", mock_step_delay=0.0)
    runtime = Runtime(settings, backends={"mock": MockBackend(), "mock-audio": MockAudioBackend()})
    with serve(create_app(runtime=runtime)) as url:
        body = {"kind": "txt2speech", "text": "one two three four five six", "user_id": "ann"}
        job_id = submit(url, **body)["id"]
        page = open_page(browser, url, "ann")
        player = page.wait_for_selector(f"{card(job_id)} audio.result-audio[src]")
        page.wait_for_function("a => a.readyState >= 1 && a.duration > 0", arg=player)
        seconds = page.evaluate("a => a.duration", player)
        assert abs(seconds - 2.0) < 0.05  # six words at 3 a second (the mock's estimate)
        assert "1 clip" in page.inner_text(f"{card(job_id)} .status")
        assert page.errors == []
        page.context.close()


def test_with_tokens_the_page_asks_for_one_and_sends_it(
    browser: Any, tmp_path_factory: pytest.TempPathFactory
) -> None:
    """Auth on: the page and its files are open, the API calls carry the typed token,
    images come through it too, and a service sees only its own jobs."""
    from easel.api import create_app
    from easel.config import Safety, Settings

    tokens = [{"service": "web", "token": "web-token-0123456789"},
              {"service": "bot", "token": "bot-token-0123456789"}]  # fmt: skip
    settings = Settings(
        data_dir=tmp_path_factory.mktemp("ui-auth") / "data",
        backend="mock",
        mock_step_delay=0.0,
        safety=Safety.model_validate({"tokens": tokens}),
    )
    with serve(create_app(settings)) as url:
        other = httpx.post(
            f"{url}/v1/jobs",
            json={"prompt": "the bot's job", "user_id": "kay", "width": 64, "height": 64},
            headers={"authorization": "Bearer bot-token-0123456789"},
        )
        assert other.status_code == 202
        context = browser.new_context(viewport=DESKTOP)
        page = context.new_page()
        page.set_default_timeout(WAIT_MS)
        page.goto(url)
        page.locator("#notice").filter(has_text="token").wait_for()
        page.fill("#user", "kay")
        page.press("#user", "Tab")
        page.fill("#token", "web-token-0123456789")
        page.click("#identity button[type=submit]")
        page.wait_for_selector("body[data-ready=true]")
        job_id = generate(page, "a token-carrying fox")
        page.wait_for_function(
            "sel => { const i = document.querySelector(sel); return i && i.naturalWidth === 64; }",
            arg=f"{card(job_id)} img.result",
        )
        assert page.locator("#my-jobs .job").count() == 1  # the bot's job of kay is not ours
        context.close()


def test_img2img_upload(browser: Any, mock_server: Process) -> None:
    """A start image picked in the form goes with the job, which runs as img2img."""
    import io

    from PIL import Image

    buffer = io.BytesIO()
    Image.new("RGB", (64, 64), (200, 30, 30)).save(buffer, "PNG")
    url = mock_server.url
    page = open_page(browser, url, "ines")
    page.click("#img2img-box summary")
    page.set_input_files(
        "#init_image", {"name": "red.png", "mimeType": "image/png", "buffer": buffer.getvalue()}
    )
    page.fill("#strength", "0.3")
    job_id = generate(page, "the same, in blue")
    page.wait_for_selector(f"{card(job_id)}[data-state=succeeded] img.result")
    request = httpx.get(f"{url}/v1/jobs/{job_id}").json()["request"]
    assert request["kind"] == "img2img" and request["strength"] == 0.3
    assert page.errors == []
    page.context.close()
