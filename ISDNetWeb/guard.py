"""Limits on what a websocket client may send, which trame 4 and wslink 2.6 do not set themselves.

``install`` puts them on the wslink handlers of the server trame binds: a message may claim at most a given
size, with few pending at a time (wslink allocates the whole size a message's first frame claims); a client may
change only the state that the page's inputs bind (``bound_keys``), never the server's own (its messages, lists,
chart, page templates), so nothing one client sends reaches another as HTML or script; and errors go back to a
client without the server's traceback. It works through wslink's ``WslinkHandler`` (``onConnect``,
``unchunkers``, ``onCompleteMessage``, ``sendWrappedError``), which ``Testing/test_web_attacks.py`` exercises.
"""

from __future__ import annotations

import re
from collections.abc import Collection
from typing import Any, Optional

from wslink.chunking import ID_LENGTH, MESSAGE_SIZE_LENGTH, MESSAGE_SIZE_LOCATION, UnChunker
from wslink.protocol import WslinkHandler

MAX_PENDING = 4  # messages a client may have half sent at once
MAX_TEXT = 10_000  # characters of a string a client may set
STATE_UPDATE = "trame.state.update"
BOUND = re.compile(r"""v-model(?:\.\w+)*="(\w+)\"""")


class BoundedUnChunker(UnChunker):
    """wslink's reassembly of chunked messages, with a cap on the bytes that pending messages claim together."""

    def __init__(self, max_bytes: int):
        super().__init__()
        self.limit = max_bytes

    def set_max_message_size(self, size: int) -> None:
        super().set_max_message_size(min(size, self.limit))

    def process_chunk(self, chunk: bytes) -> Optional[Any]:
        message_id = int.from_bytes(chunk[:ID_LENGTH], "little")
        if message_id not in self.pending_messages:
            size = int.from_bytes(chunk[MESSAGE_SIZE_LOCATION:MESSAGE_SIZE_LOCATION + MESSAGE_SIZE_LENGTH], "little")
            claimed = sum(len(message["content"]) for message in self.pending_messages.values())
            if len(self.pending_messages) >= MAX_PENDING or claimed + size > self.max_message_size:
                raise ValueError(f"a client's pending messages claim {claimed + size} bytes, beyond the "
                                 f"{self.max_message_size} allowed in at most {MAX_PENDING} messages")
        return super().process_chunk(chunk)


def bound_keys(state: dict[str, Any]) -> frozenset[str]:
    """The state keys that the page's templates bind to inputs with ``v-model``: all that a client may change."""
    templates = (v for k, v in state.items() if k.startswith("trame__template_") and isinstance(v, str))
    return frozenset(key for template in templates for key in BOUND.findall(template))


def _plain(value: Any) -> bool:
    """A value an input gives: a number, a flag, a short string, nothing, or a short list of numbers."""
    if isinstance(value, str):
        return len(value) <= MAX_TEXT
    if isinstance(value, list):
        return len(value) <= 16 and all(isinstance(v, (int, float)) for v in value)
    return value is None or isinstance(value, (bool, int, float))


def writable_changes(changes: Any, writable: Collection[str]) -> list[dict[str, Any]]:
    """The entries of a client's state update that set a key it may change to a plain value; others are dropped."""
    if not isinstance(changes, list):
        return []
    return [c for c in changes if isinstance(c, dict) and c.get("key") in writable and _plain(c.get("value"))]


def install(wslink_server: Any, max_message_bytes: int, writable: Collection[str]) -> None:
    """Put the limits on every wslink handler of ``wslink_server`` (trame's ``on_server_bind`` argument).

    ``writable`` holds the keys a client may change; it is read at each update, so the caller may fill it once the
    page's state is ready (until then a client changes nothing).
    """
    handlers = {getattr(route.handler, "__self__", None) for route in wslink_server.app.router.routes()}
    for handler in handlers:
        if isinstance(handler, WslinkHandler):
            _guard(handler, max_message_bytes, writable)


def _guard(handler: WslinkHandler, max_message_bytes: int, writable: Collection[str]) -> None:
    connect, complete, send_error = handler.onConnect, handler.onCompleteMessage, handler.sendWrappedError

    async def on_connect(request: Any, client_id: str) -> None:
        await connect(request, client_id)
        handler.unchunkers[client_id] = BoundedUnChunker(max_message_bytes)

    async def on_complete_message(rpc: Any, client_id: str) -> None:
        if isinstance(rpc, dict) and rpc.get("method") == STATE_UPDATE:
            args = rpc.get("args")
            rpc = {**rpc, "args": [writable_changes(args[0] if isinstance(args, list) and args else None, writable)]}
        await complete(rpc, client_id)

    async def send_wrapped_error(rpcid: Any, code: int, message: str, data: Any = None,
                                 client_id: Optional[str] = None) -> None:
        await send_error(rpcid, code, message, None, client_id=client_id)  # the traceback stays in the server log

    handler.onConnect, handler.onCompleteMessage = on_connect, on_complete_message
    handler.sendWrappedError = send_wrapped_error
