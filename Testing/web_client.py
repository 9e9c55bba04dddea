"""A web app server for the tests, and a client of its websocket that speaks wslink without a browser.

``Server`` runs ``isdnet-web`` in a process group of its own and reads its output in a thread. ``WslinkClient``
sends what any program (or another website's script) can send: the wslink hello with a secret, then trame's
``trame.trigger`` and ``trame.state.update`` calls, and raw frames; it is how the tests attack the server.
"""

from __future__ import annotations

import json
import os
import queue
import re
import secrets
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any, Optional

import aiohttp
import msgpack

ROOT = Path(__file__).resolve().parent.parent


class Server:
    """``isdnet-web`` in its own process group; its output is read by a thread so waits stay bounded."""

    def __init__(self, workspace: Path, *arguments: str):
        self.lines: queue.Queue[str] = queue.Queue()
        self.log: list[str] = []
        self.process = subprocess.Popen(
            [sys.executable, "-m", "ISDNetWeb", "--port", "0", "--workspace", str(workspace), "--device", "cpu",
             *arguments],
            cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True,
            env=dict(os.environ), encoding="utf-8")
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        assert self.process.stdout is not None
        for line in self.process.stdout:
            self.lines.put(line.rstrip("\n"))

    def wait_for(self, text: str, timeout_s: float) -> str:
        """The first line of the server's output containing ``text``."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            try:
                line = self.lines.get(timeout=0.5)
            except queue.Empty:
                if self.process.poll() is not None:
                    break
                continue
            self.log.append(line)
            if text in line:
                return line
        raise AssertionError(f"the server did not print {text!r} within {timeout_s:.0f} s; its output:\n"
                             + "\n".join(self.log[-40:]))

    def url(self, timeout_s: float = 120.0) -> str:
        return self.wait_for("ISDNet web: serving", timeout_s).split(" on ", 1)[1].strip()

    def stop(self) -> None:
        """End the server and everything it started (training and segmentation children)."""
        for sig, wait_s in ((signal.SIGTERM, 10), (signal.SIGKILL, 10)):
            try:
                os.killpg(self.process.pid, sig)
            except ProcessLookupError:
                return
            try:
                self.process.wait(wait_s)
                return
            except subprocess.TimeoutExpired:
                continue


HEADER_BYTES = 12  # wslink's chunk header: message id, offset and total size, each a little-endian uint32


def chunk(message: bytes, message_id: Optional[int] = None, claimed_size: Optional[int] = None) -> bytes:
    """One wslink frame holding all of ``message``; ``claimed_size`` lies about the message's total size."""
    message_id = secrets.randbits(32) if message_id is None else message_id
    size = len(message) if claimed_size is None else claimed_size
    return b"".join(v.to_bytes(4, "little") for v in (message_id, 0, size)) + message


class WslinkClient:
    """One websocket connection to the app, used from async tests."""

    def __init__(self, session: aiohttp.ClientSession, websocket: aiohttp.ClientWebSocketResponse):
        self.session, self.websocket = session, websocket
        self.client_id = "c0"
        self._calls = 0

    @classmethod
    async def connect(cls, base_url: str, origin: Optional[str] = None, **headers: str) -> WslinkClient:
        """Open ``ws://host:port/ws`` of ``base_url`` (the printed address), sending ``origin`` if given."""
        session = aiohttp.ClientSession()
        if origin is not None:
            headers["Origin"] = origin
        root, _, query = base_url.partition("?")
        url = re.sub(r"^http", "ws", root.split("/index.html")[0].rstrip("/")) + "/ws" + (f"?{query}" if query else "")
        try:
            websocket = await session.ws_connect(url, headers=headers, max_msg_size=0)
        except BaseException:
            await session.close()
            raise
        return cls(session, websocket)

    async def close(self) -> None:
        await self.websocket.close()
        await self.session.close()

    async def send(self, message: dict[str, Any]) -> None:
        await self.websocket.send_bytes(chunk(msgpack.packb(message)))

    async def reply(self, call_id: str, timeout_s: float = 30.0) -> dict[str, Any]:
        """The answer to ``call_id``, skipping the state the server publishes meanwhile."""
        deadline = time.monotonic() + timeout_s
        while True:
            frame = await self.websocket.receive(timeout=max(0.1, deadline - time.monotonic()))
            if frame.type != aiohttp.WSMsgType.BINARY:
                raise ConnectionError(f"the server closed the connection ({frame.type.name}, {frame.extra})")
            message = msgpack.unpackb(frame.data[HEADER_BYTES:])  # the tests' answers fit in one frame
            if message.get("id") == call_id:
                return message

    async def hello(self, secret: str) -> dict[str, Any]:
        """Authenticate with ``secret``; returns the server's answer (a result, or an error)."""
        await self.send({"wslink": "1.0", "id": "system:c0:0", "method": "wslink.hello",
                         "args": [{"secret": secret}], "kwargs": {}})
        answer = await self.reply("system:c0:0")
        if "result" in answer:
            self.client_id = answer["result"]["clientID"]
        return answer

    async def call(self, method: str, *args: Any) -> dict[str, Any]:
        self._calls += 1
        call_id = f"rpc:{self.client_id}:{self._calls}"
        await self.send({"wslink": "1.0", "id": call_id, "method": method, "args": list(args), "kwargs": {}})
        return await self.reply(call_id)

    async def state(self) -> dict[str, Any]:
        """The server's state as a new page receives it (its templates included)."""
        return (await self.call("trame.state.get"))["result"]["state"]

    async def set_state(self, **values: Any) -> dict[str, Any]:
        return await self.call("trame.state.update", [{"key": k, "value": v} for k, v in values.items()])

    async def trigger(self, name: str, *args: Any) -> dict[str, Any]:
        return await self.call("trame.trigger", name, list(args), {})


def trigger_names(state: dict[str, Any]) -> dict[str, str]:
    """The page's trigger for each element id (``train``, ``load-file``, ...), read from its template."""
    template = "".join(v for k, v in state.items() if k.startswith("trame__template_") and isinstance(v, str))
    names = {}
    for tag in re.finditer(r'<[\w.-]+((?:\s+[^\s=>"/]+(?:="[^"]*")?)*)\s*/?>', template):  # quoted values may hold >
        element_id = re.search(r'\sid="([^"]+)"', tag.group(1))
        found = re.search(r"trigger\('(trigger__\d+)'", tag.group(1))
        if element_id and found:
            names[element_id.group(1)] = found.group(1)
    return names


def secret_of(base_url: str) -> str:
    """The wslink secret the page served by the app gets (where the page's script asks for its session)."""
    import urllib.request

    root, _, query = base_url.partition("?")
    request = urllib.request.Request(root.split("/index.html")[0].rstrip("/") + "/paraview/"
                                     + (f"?{query}" if query else ""), data=b"{}", method="POST")
    with urllib.request.urlopen(request, timeout=10) as answer:
        return json.loads(answer.read())["secret"]
