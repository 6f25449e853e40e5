"""The page that runs a .tflite file in a browser (python -m convmixer_tf.web), in a real
Chromium: MediaPipe Tasks for Web gives, for held-out digits, the scores MediaPipe's own
Python ImageClassifier gives for the same file and pixels; MediaPipe's usage log, posted
once a minute, is blocked by the page's Content Security Policy and no request leaves the
page's origin; the static folder (--output) works from another server and keeps the
output rules. Screenshots of the page on a phone and a desktop screen are saved under the
test's folder ($CONVMIXER_SCREENSHOTS: copied there too)."""

import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
from conftest import DIGIT_NAMES, write_pngs

from convmixer_tf import web
from convmixer_tf.web import MEDIAPIPE_PACKAGE, MEDIAPIPE_VERSION, bundle, find_mediapipe
from convmixer_tf.web.__main__ import main

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
IMAGES = 8  # held-out digits each page classifies
LOG_ENDPOINT = "https://odml.pa.googleapis.com/v1/log"  # where MediaPipe posts usage logs
PHONE, DESKTOP = {"width": 390, "height": 844}, {"width": 1280, "height": 800}


def _needed(missing: str, install: str):
    """Skipped here when a browser piece is missing; in CI (which installs it) a failure."""
    message = f"{missing}: {install}"
    (pytest.fail if os.environ.get("CI") else pytest.skip)(message)


@pytest.fixture(scope="module")
def browser():
    if CHROMIUM is None:
        _needed("no Chromium", "apt-get install chromium")
    try:
        find_mediapipe()
    except ValueError as err:
        _needed(f"no {MEDIAPIPE_PACKAGE}", str(err))
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        chromium = playwright.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"])
        yield chromium
        chromium.close()


@pytest.fixture(scope="module")
def digit_pngs(digits, tmp_path_factory):
    images, labels = digits["held_out"]
    folder = write_pngs(tmp_path_factory.mktemp("digits"), images[:IMAGES])
    return sorted(os.path.join(folder, name) for name in os.listdir(folder)), labels[:IMAGES]


@contextlib.contextmanager
def served(*args, command=(sys.executable, "-m", "convmixer_tf.web"), **popen):
    """The web command (`command`, a real process, started with `popen`'s keywords)
    serving on a free port: its address."""
    command = [*command, "--port", "0", *args]
    with subprocess.Popen(command, stdout=subprocess.PIPE, text=True, **popen) as process:
        try:
            address = process.stdout.readline().strip()
            assert address.startswith("http://127.0.0.1:"), address
            yield address
        finally:
            process.send_signal(signal.SIGINT)  # how a user stops it


def until(page, condition, timeout: float = 60):
    """The value of `condition` (an expression in the page, or a function called here) once
    it is truthy. Polled from outside (the page's CSP forbids the eval that
    page.wait_for_function would need), waiting through Playwright so that its events,
    routing included, are handled meanwhile."""
    check = condition if callable(condition) else lambda: page.evaluate(condition)
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        value = check()
        if value:
            return value
        page.wait_for_timeout(50)
    raise AssertionError(f"{condition} stayed false for {timeout} s")


def minutes_pass(page, condition, minutes: int = 3):
    """Runs the page's clock (page.clock) a minute at a time, with a second of real time
    after each for what the timers started, until `condition()` is truthy. (One jump of
    several minutes can end before a timer's asynchronous work has scheduled the next.)"""
    for _ in range(minutes):
        page.clock.run_for("01:00")
        with contextlib.suppress(AssertionError):
            return until(page, condition, timeout=1)
    raise AssertionError(f"{condition} stayed false for {minutes} minutes of the page's clock")


def open_page(browser, address, *, viewport=PHONE, bypass_csp=False, clock=False):
    """A page of `address` once its model is loaded, the URLs it asked for (a list that
    grows; recorded by routing every request: those to another origin are aborted, so none
    leaves this machine) and the requests its CSP blocked. `clock`: Playwright's clock
    drives the page's timers (`page.clock.run_for`)."""
    context = browser.new_context(viewport=viewport, bypass_csp=bypass_csp)
    page = context.new_page()
    requests = []

    def route(route):
        requests.append(route.request.url)
        route.continue_() if route.request.url.startswith(address) else route.abort()

    context.route("**/*", route)
    page.add_init_script(
        "window.blocked = []; document.addEventListener('securitypolicyviolation', "
        "(event) => window.blocked.push([event.blockedURI, event.violatedDirective]));"
    )
    if clock:
        page.clock.install()
    page.goto(address)
    until(page, "window.convmixer && (window.convmixer.ready || window.convmixer.error)")
    assert page.evaluate("window.convmixer.error") is None
    return page, requests


def classify(page, path) -> list:
    """The page's top 5 for the image file at `path`, chosen as a user does: [(index, name,
    score)]."""
    page.evaluate("window.convmixer.lastResult = null")
    page.set_input_files("#file", path)
    result = until(page, "window.convmixer.lastResult")
    return [(c["index"], c["name"], c["score"]) for c in result["top"]]


def mediapipe_scores(model, paths) -> np.ndarray:
    """MediaPipe's Python ImageClassifier on the same file and pixels: [image, class]."""
    from PIL import Image

    from convmixer_tf.export import mobile

    pixels = np.stack([np.asarray(Image.open(path).convert("RGB")) for path in paths])
    return mobile.classify(model, pixels, len(DIGIT_NAMES))[0]


@pytest.mark.parametrize("name, tolerance", [("model.tflite", 1e-6), ("model_int8.tflite", 0)])
def test_the_page_gives_what_mediapipe_gives(
    browser, exported, digit_pngs, tmp_path, name, tolerance
):
    paths, labels = digit_pngs
    reference = mediapipe_scores(exported / name, paths)
    with served("--model", str(exported / name)) as address:
        page, requests = open_page(browser, address)
        for path, label, expected in zip(paths, labels, reference):
            top = classify(page, path)
            assert len(top) == 5 and top[0][1] == DIGIT_NAMES[label], (path, top)
            scores = np.array([score for _, _, score in top])
            assert np.all(np.diff(scores) <= 0)  # best first
            for index, class_name, score in top:  # each as MediaPipe scores that class
                assert class_name == DIGIT_NAMES[index]
                assert abs(score - expected[index]) <= tolerance, (path, index, score, expected)
            np.testing.assert_allclose(scores, np.sort(expected)[::-1][:5], rtol=0, atol=tolerance)
        page.screenshot(path=tmp_path / "phone.png")
        assert _outside(requests, address) == []
        assert "model.tflite" in {url.rsplit("/", 1)[-1] for url in requests}
    _keep(tmp_path / "phone.png", f"web-phone-{name}.png")


@pytest.mark.parametrize("csp", ["on", "bypassed"])
def test_mediapipes_usage_log_never_leaves_the_page(browser, exported, digit_pngs, csp):
    """MediaPipe Tasks for Web posts usage logs to a Google endpoint once a minute: with the
    page's CSP the post is blocked (connect-src) and no request leaves the page's origin.
    With the CSP bypassed, the same minute shows the post (aborted by the routing), so
    the recording would catch a leak."""
    with served("--model", str(exported / "model_int8.tflite")) as address:
        page, requests = open_page(browser, address, bypass_csp=csp == "bypassed", clock=True)
        classify(page, digit_pngs[0][0])
        if csp == "on":
            minutes_pass(page, lambda: page.evaluate("window.blocked.length"))
        else:
            minutes_pass(page, lambda: _outside(requests, address))
        blocked = {tuple(each) for each in page.evaluate("window.blocked")}
        page.context.close()
    if csp == "on":
        assert _outside(requests, address) == []
        assert blocked == {(LOG_ENDPOINT, "connect-src")}
    else:
        assert set(_outside(requests, address)) == {LOG_ENDPOINT} and blocked == set()


def test_the_static_folder_works_from_another_server(browser, exported, digit_pngs, tmp_path):
    """Served by Python's http.server (no CSP header: the meta tag's applies), the copy
    gives what the command's page gives, and keeps MediaPipe's usage log in."""
    out = tmp_path / "site"
    assert main(["--model", str(exported / "model_int8.tflite"), "--output", str(out)]) == 0
    with served("--model", str(exported / "model_int8.tflite")) as address:
        page, _ = open_page(browser, address)
        expected = classify(page, digit_pngs[0][0])
    command = [sys.executable, "-m", "http.server", "0", "--bind", "127.0.0.1", "-d", str(out)]
    with subprocess.Popen(command, stdout=subprocess.PIPE, text=True) as server:
        try:
            port = server.stdout.readline().split("port ")[1].split()[0]
            origin = f"http://127.0.0.1:{port}/"
            page, requests = open_page(browser, origin, viewport=DESKTOP, clock=True)
            assert classify(page, digit_pngs[0][0]) == expected
            page.screenshot(path=tmp_path / "desktop.png")
            minutes_pass(page, lambda: page.evaluate("window.blocked.length"))  # the usage log
            assert page.evaluate("window.blocked") == [[LOG_ENDPOINT, "connect-src"]]
            assert _outside(requests, origin) == []
        finally:
            server.terminate()
    _keep(tmp_path / "desktop.png", "web-desktop.png")


def test_the_static_folder_keeps_the_output_rules(exported, tmp_path, capsys):
    model = str(exported / "model.tflite")
    out = tmp_path / "site"
    assert main(["--model", model, "--output", str(out)]) == 0
    assert sorted(os.listdir(out)) == sorted(
        ["index.html", "app.js", "style.css", "model.tflite", "config.json", "mediapipe", "RECORD"]
    )
    assert "Content-Security-Policy" in (out / "index.html").read_text()
    assert (out / "model.tflite").read_bytes() == (exported / "model.tflite").read_bytes()
    assert main(["--model", model, "--output", str(out)]) == 2  # exists: --force needed
    assert main(["--model", model, "--output", str(out), "--force"]) == 0
    (out / "notes.txt").write_text("mine")
    assert main(["--model", model, "--output", str(out), "--force"]) == 2
    assert (out / "notes.txt").read_text() == "mine"
    assert "notes.txt" in capsys.readouterr().err


def test_bad_arguments_are_exit_2(exported, tmp_path, capsys):
    not_ours = tmp_path / "other.tflite"
    not_ours.write_bytes(b"TFL3 but not a model of ours")
    busy = __import__("socket").socket()
    busy.bind(("127.0.0.1", 0))
    busy.listen()
    model = str(exported / "model.tflite")
    cases = [
        (["--model", str(tmp_path / "missing.tflite")], "model not found"),
        (["--model", str(exported / "model.onnx")], "is not a .tflite file"),
        (["--model", str(not_ours)], "truncated or damaged"),
        (["--model", model, "--mediapipe", str(tmp_path)], "npm ci"),
        (["--model", model, "--port", str(busy.getsockname()[1])], "pass another --port"),
        (["--model", model, "--port", "70000"], "port number"),
        (["--model", model, "--output", str(exported)], "contains the input"),
        (["--model", model, "--output", str(tmp_path)], "holds other.tflite and no RECORD"),
    ]
    with busy:
        for argv, message in cases:
            with pytest.raises(SystemExit) if "70000" in argv else contextlib.nullcontext():
                assert main(argv) == 2, argv
            err = capsys.readouterr().err
            assert message in err and err.count("\n") == 1, (argv, err)


def test_ctrl_c_stops_serving(exported):
    """Serving is what the command does until Ctrl-C: then it stops, exit 0."""
    import urllib.request

    command = [sys.executable, "-m", "convmixer_tf.web", "--port", "0"]
    command += ["--model", str(exported / "model.tflite")]
    with subprocess.Popen(
        command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    ) as process:
        address = process.stdout.readline().strip()
        with urllib.request.urlopen(address + "config.json") as answer:
            assert answer.headers["Content-Security-Policy"].startswith("default-src 'none'")
            assert json.load(answer)["file"] == "model.tflite"
        with pytest.raises(urllib.error.HTTPError, match="404"):
            urllib.request.urlopen(address + "../setup.cfg")
        process.send_signal(signal.SIGINT)
        _, err = process.communicate(timeout=30)
    assert process.returncode == 0, err
    assert err.splitlines()[-1] == "stopped"


def test_a_rebound_name_reads_nothing_in_a_browser(browser, exported, tmp_path):
    """DNS rebinding as a browser meets it: a second Chromium resolves evil.example to
    127.0.0.1 (--host-resolver-rules), as a rebinding attacker's DNS would; its page and
    fetches then carry Host: evil.example, and the server answers 421, under its CSP."""
    rules = "--host-resolver-rules=MAP evil.example 127.0.0.1"
    chromium = browser.browser_type.launch(executable_path=CHROMIUM, args=["--no-sandbox", rules])
    with served("--model", str(exported / "model_int8.tflite")) as address:
        port = address.rstrip("/").rsplit(":", 1)[1]
        page = chromium.new_page()
        for url, status in [
            (f"http://evil.example:{port}/model.tflite", 421),
            (f"http://evil.example:{port}/", 421),
            (f"http://localhost:{port}/config.json", 200),
        ]:
            answer = page.goto(url)
            assert answer.status == status, url
            assert answer.headers["x-content-type-options"] == "nosniff"
            assert answer.headers["content-security-policy"].startswith("default-src 'none'")
        page.goto(f"http://evil.example:{port}/")
        page.screenshot(path=tmp_path / "misdirected.png")
    chromium.close()


def test_the_page_is_written_for_the_version_npm_pins():
    with open(os.path.join(REPO, "package.json")) as f:
        assert json.load(f)["dependencies"][MEDIAPIPE_PACKAGE] == MEDIAPIPE_VERSION
    with open(os.path.join(REPO, "package-lock.json")) as f:
        locked = json.load(f)["packages"][f"node_modules/{MEDIAPIPE_PACKAGE}"]
    assert (locked["version"], locked["license"]) == (MEDIAPIPE_VERSION, "Apache-2.0")


@pytest.fixture
def installed():
    """node_modules/'s @mediapipe/tasks-vision, where `npm ci` put it."""
    folder = os.path.join(REPO, "node_modules", *MEDIAPIPE_PACKAGE.split("/"))
    if bundle.missing(folder):
        _needed(f"no {MEDIAPIPE_PACKAGE} in node_modules", "npm ci")
    return folder


def test_the_copy_a_wheel_carries_comes_before_node_modules(installed, tmp_path, monkeypatch):
    """A wheel's copy (bundle.PACKAGED, filled by the build) is found first; --mediapipe,
    then $CONVMIXER_MEDIAPIPE, still name another copy."""
    packaged = str(tmp_path / "tasks-vision")
    bundle.copy(installed, packaged)
    assert sorted(os.listdir(packaged)) == sorted(
        ["LICENSE", "NOTICE", "package.json", "vision_bundle.mjs", "wasm"]
    )
    assert (
        f"{MEDIAPIPE_PACKAGE} {MEDIAPIPE_VERSION}" in open(os.path.join(packaged, "NOTICE")).read()
    )
    monkeypatch.delenv("CONVMIXER_MEDIAPIPE", raising=False)
    assert find_mediapipe() == installed  # the repository's folder holds LICENSE alone
    monkeypatch.setattr(web, "PACKAGED", packaged)
    assert find_mediapipe() == packaged
    monkeypatch.setenv("CONVMIXER_MEDIAPIPE", installed)
    assert find_mediapipe() == installed
    assert find_mediapipe(packaged) == packaged


def test_the_build_refuses_a_copy_of_another_version_or_with_a_file_missing(installed, tmp_path):
    other = tmp_path / "other"
    for name in (*bundle.MEDIAPIPE_FILES, bundle.METADATA):
        (other / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(os.path.join(installed, name), other / name)
    (other / bundle.METADATA).write_text('{"version": "0.10.0"}')
    with pytest.raises(ValueError, match="holds version 0.10.0: the page needs .* 1.1.0"):
        bundle.copy(str(other), str(tmp_path / "copy"))
    (other / bundle.METADATA).write_text(json.dumps({"version": MEDIAPIPE_VERSION}))
    (other / "wasm" / "vision_wasm_nosimd_internal.wasm").unlink()
    with pytest.raises(ValueError, match="lacks wasm/vision_wasm_nosimd_internal.wasm"):
        bundle.copy(str(other), str(tmp_path / "copy"))
    assert not (tmp_path / "copy").exists()


def _outside(requests, address) -> list:
    return [url for url in requests if not url.startswith(address)]


def _keep(path, name):
    """Copies a screenshot to $CONVMIXER_SCREENSHOTS, when set (docs/ takes one from there)."""
    folder = os.environ.get("CONVMIXER_SCREENSHOTS")
    if folder:
        shutil.copy(path, os.path.join(folder, name))
