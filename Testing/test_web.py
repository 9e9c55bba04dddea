"""The web app (``isdnet-web``, ISDNetWeb/): its safety rules, and the whole workflow in headless Chromium.

The browser test starts the server on a free loopback port, drives Debian's ``chromium`` through Playwright
(no downloaded browser), loads phantoms, trains a tiny model, segments, checks the colours of the axial view,
downloads the results and stops a second training mid-way. Screenshots are kept in ``$ISDNET_ARTIFACTS/web``
(default ``test-artifacts/web`` in the repository).
"""

from __future__ import annotations

import asyncio
import base64
import importlib.util
import os
import re
import shutil
import time
from collections.abc import Iterator
from io import BytesIO
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
from web_client import Server

from ISDNetWeb.cli import main as web_main
from ISDNetWeb.security import (
    TOKEN_COOKIE,
    Upload,
    Workspace,
    WorkspaceError,
    access_middleware,
    check_serving,
    safe_file_name,
)

ROOT = Path(__file__).resolve().parent.parent


CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync"]
TINY = "--base-channels 8 --batch-size 4 --slice-size 32 32 --seed 0 --precision fp32"
ARTIFACTS = Path(os.environ.get("ISDNET_ARTIFACTS", ROOT / "test-artifacts")) / "web"
TOKEN = "a-test-token-of-enough-length"


# ----- the rules, without a browser
def test_workspace_keeps_paths_inside(tmp_path):
    workspace = Workspace(tmp_path / "ws")
    (workspace.root / "a").mkdir()
    (workspace.root / "a" / "image.nii.gz").write_bytes(b"x")
    (tmp_path / "secret.nrrd").write_bytes(b"x")
    (workspace.root / "link.nrrd").symlink_to(tmp_path / "secret.nrrd")
    assert workspace.resolve("a/image.nii.gz") == workspace.root / "a" / "image.nii.gz"
    for bad in ("../secret.nrrd", "a/../../secret.nrrd", str(tmp_path / "secret.nrrd"), "", "link.nrrd"):
        with pytest.raises(WorkspaceError):
            workspace.resolve(bad)
    assert workspace.files() == ["a/image.nii.gz"]  # the link leading out is not listed


def test_upload_names_and_sizes(tmp_path):
    assert safe_file_name("../../etc/x y.nii.gz") == "x_y.nii.gz"
    assert safe_file_name("C:\\data\\case.SEG.NRRD") == "case.seg.nrrd"  # the ending normalised
    for bad in ("script.py", "archive.zip", "noext", ".nii.gz.exe"):
        with pytest.raises(WorkspaceError, match="not an image"):
            safe_file_name(bad)
    with pytest.raises(WorkspaceError, match="upload limit"):
        Upload.from_client({"name": "big.nrrd", "size": 11, "content": b"x" * 11}, max_bytes=10)
    with pytest.raises(WorkspaceError, match="upload limit"):  # a lying size field does not help
        Upload.from_client({"name": "big.nrrd", "size": 1, "content": [b"x" * 6, b"x" * 6]}, max_bytes=10)
    with pytest.raises(WorkspaceError, match="empty"):
        Upload.from_client({"name": "e.nrrd", "size": 0, "content": b""}, max_bytes=10)
    upload = Upload.from_client({"name": "v.nii.gz", "size": 3, "content": [b"ab", b"c"]}, max_bytes=10)
    assert upload.save(tmp_path) == tmp_path / "v.nii.gz"
    assert upload.save(tmp_path) == tmp_path / "v_2.nii.gz"  # never replaces a file


def test_serving_beyond_loopback_needs_a_token(capsys):
    check_serving("127.0.0.1", None)
    check_serving("::1", None)
    check_serving("0.0.0.0", TOKEN)
    with pytest.raises(WorkspaceError, match="token"):
        check_serving("0.0.0.0", None)
    for bad in ("short", " " * 20, "a token with spaces inside", "tab\tseparated-token-text"):
        with pytest.raises(WorkspaceError, match="16 characters, printable and without spaces"):
            check_serving("127.0.0.1", bad)
    assert web_main(["--host", "0.0.0.0", "--token", ""]) == 2
    assert "needs an access token" in capsys.readouterr().err


def test_access_middleware():
    aiohttp = pytest.importorskip("aiohttp")
    from aiohttp import web
    from aiohttp.test_utils import TestClient, TestServer

    async def scenario() -> None:
        async def hello(_request):
            return web.Response(text="hello")

        for token, loopback_only in ((TOKEN, False), (None, True)):
            app = web.Application(middlewares=[access_middleware(token, loopback_only)])
            app.router.add_get("/", hello)
            async with TestClient(TestServer(app, host="127.0.0.1")) as client:
                if token:
                    assert (await client.get("/")).status == 401
                    assert (await client.get("/?token=wrong-token-wrong-token")).status == 401
                    response = await client.get(f"/?token={TOKEN}")
                    assert response.status == 200 and TOKEN_COOKIE in response.cookies
                    assert (await client.get("/")).status == 200  # the cookie now carries the token
                else:
                    assert (await client.get("/")).status == 200
                    forged = await client.get("/", headers={"Host": "attacker.example:80"})
                    assert forged.status == 403

    assert aiohttp
    asyncio.run(scenario())


def test_chart():
    pytest.importorskip("slicer")
    from ISDNetWeb.chart import training_chart

    assert "no epoch" in training_chart({})
    svg = training_chart({1: {"dice": 0.8, "adv": 0.7, "val_dice": 0.3}, 2: {"dice": 0.5, "adv": 0.6,
                                                                            "val_dice": 0.6}})
    assert svg.count("<polyline") == 3 and "validation Dice" in svg and "Dice loss" in svg


# ----- the workflow in Chromium
def _missing_for_browser() -> str:
    if CHROMIUM is None:
        return "Chromium is not installed (apt-get install chromium); .ci/run installs it"
    for module, install in (("playwright", "pip install playwright (no 'playwright install' needed)"),
                            ("trame_slicer", 'pip install "trame-slicer[standalone]==2.0.0"')):
        if importlib.util.find_spec(module) is None:
            return f"{module} is missing: {install}"
    return ""


@pytest.fixture
def web_server(tmp_path) -> Iterator[tuple[str, Path]]:
    from isdnet.phantoms import write_phantom_dataset

    workspace = tmp_path / "workspace"
    write_phantom_dataset(workspace / "phantoms", 3, shape=(12, 48, 48))
    server = Server(workspace, "--token", TOKEN, "--train-options", TINY)
    try:
        yield server.url(), workspace
    finally:
        server.stop()


def wait_for_text(page, selector: str, texts: tuple[str, ...], timeout_s: float, what: str) -> str:
    """Poll an element until it holds one of ``texts``; fail naming what was awaited and what it showed."""
    deadline = time.monotonic() + timeout_s
    shown = ""
    while time.monotonic() < deadline:
        shown = page.locator(selector).inner_text()
        if any(t in shown for t in texts):
            return shown
        page.wait_for_timeout(500)
    raise AssertionError(f"{what}: waited {timeout_s:.0f} s for {texts} in {selector}; it shows {shown!r}")


def pick(page, select_id: str, option: str) -> None:
    page.locator(f"#{select_id}").click(force=True)
    page.get_by_role("option", name=option, exact=True).click()


def axial_view(page, name: str) -> np.ndarray:
    """A screenshot of the axial view (the first view of the page) as RGB, kept as an artefact."""
    from PIL import Image

    data = page.locator("img.image-display-area").first.screenshot()
    (ARTIFACTS / f"{name}.png").write_bytes(data)
    return np.asarray(Image.open(BytesIO(data)).convert("RGB")).astype(int)


def coloured_fraction(rgb: np.ndarray) -> float:
    """Share of pixels clearly not grey (the image is greyscale; segments are drawn in colour)."""
    return float(((rgb.max(axis=2) - rgb.min(axis=2)) > 40).mean())


def load(page, kind: str, file: str) -> None:
    page.click(f"#kind-{kind}")
    pick(page, "workspace-file", file)
    page.click("#load-file")
    case = file.rsplit("/", 1)[-1].removesuffix(".nii.gz")
    expected = f"'{case}.nii.gz' is now the label of '{case}'" if kind == "label" else f"Loaded '{case}'"
    wait_for_text(page, "#message", (expected,), 60, f"loading {file}")


@pytest.mark.slow
@pytest.mark.skipif(bool(_missing_for_browser()), reason=_missing_for_browser())
def test_train_and_segment_in_chromium(web_server):
    from playwright.sync_api import sync_playwright

    url, workspace = web_server
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_FLAGS)
        try:
            page = browser.new_context(viewport={"width": 1400, "height": 900}, accept_downloads=True).new_page()
            page.set_default_timeout(60_000)
            page.goto(url)
            page.wait_for_selector("#workspace-file", timeout=90_000)

            for case in ("phantom_000", "phantom_001"):
                load(page, "image", f"phantoms/imagesTr/{case}.nii.gz")
                load(page, "label", f"phantoms/labelsTr/{case}.nii.gz")
            page.click("#kind-image")
            page.set_input_files("#upload", str(workspace / "phantoms" / "imagesTr" / "phantom_002.nii.gz"))
            wait_for_text(page, "#message", ("Loaded 'phantom_002'",), 60, "uploading phantom_002")
            assert (workspace / "uploads" / "phantom_002.nii.gz").is_file()
            page.wait_for_timeout(2000)
            before = axial_view(page, "web-1-loaded")
            assert coloured_fraction(before) < 0.002, "the unlabeled volume shows colours before segmentation"

            page.fill("#model-name", "tiny")
            page.fill("#epochs", "3")
            page.click("#train")
            wait_for_text(page, "#message", ("Training finished", "Training failed"), 300, "the first training")
            assert "Training finished" in page.locator("#message").inner_text()
            chart = page.locator("#chart").get_attribute("src")
            assert chart.startswith("data:image/svg+xml;base64,"), "the chart is not an image"
            assert base64.b64decode(chart.split(",", 1)[1]).count(b"<polyline") >= 2, "no loss/Dice curves"
            page.screenshot(path=str(ARTIFACTS / "web-2-trained.png"))

            page.get_by_text("phantom_002", exact=True).click()
            page.click("#segment")
            wait_for_text(page, "#message", ("Segmented", "Segmentation failed"), 180, "the segmentation")
            assert "Segmented" in page.locator("#message").inner_text()
            page.wait_for_timeout(3000)  # let the views stream the new frame
            after = axial_view(page, "web-3-segmented")
            assert coloured_fraction(after) > 0.01, "the segment is not visible in the axial view"
            page.screenshot(path=str(ARTIFACTS / "web-app.png"))

            page.click("#confidence")
            page.wait_for_timeout(3000)
            confidence = axial_view(page, "web-4-confidence")
            assert np.abs(confidence - after).mean() > 2, "the confidence map did not change the axial view"
            page.click("#confidence")

            with page.expect_download(timeout=60_000) as download:
                page.click("#download-segmentation")
            segmentation = ARTIFACTS / "phantom_002.seg.nrrd"
            download.value.save_as(segmentation)
            labels = sitk.GetArrayFromImage(sitk.ReadImage(str(segmentation)))
            assert labels.any(), "the downloaded .seg.nrrd is empty"
            with page.expect_download(timeout=60_000) as download:
                page.click("#download-model")
            model = ARTIFACTS / "tiny.safetensors"
            download.value.save_as(model)
            assert model.read_bytes() == (workspace / "models" / "tiny.safetensors").read_bytes()

            page.fill("#model-name", "long")
            page.fill("#epochs", "200")
            page.click("#train")
            wait_for_text(page, "#train-progress", ("iteration",), 120, "the second training to report progress")
            page.screenshot(path=str(ARTIFACTS / "web-5-training.png"))
            page.click("#stop")
            message = wait_for_text(page, "#message", ("Training stopped",), 60, "stopping the second training")
            stopped_at = re.search(r"during epoch (\d+) of 200", message)
            assert stopped_at and int(stopped_at.group(1)) < 200, message
            # Stopped long before its 200 epochs, with a checkpoint to resume from (an epoch that finished before
            # Stop may also have written the best model so far: that is kept, not a sign of a run to the end).
            checkpoints = list((workspace / "models").glob("long.checkpoint*.safetensors"))
            assert checkpoints or "no checkpoint" in message, message
        finally:
            browser.close()
