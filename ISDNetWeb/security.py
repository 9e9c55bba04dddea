"""What keeps the web app safe to serve: the workspace boundary, upload checks, and the access-token gate.

Nothing here imports trame or Slicer, so it is tested on its own.
"""

from __future__ import annotations

import hmac
import ipaddress
import re
from collections.abc import Awaitable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Optional

IMAGE_ENDINGS = (".seg.nrrd", ".nii.gz", ".nii", ".nrrd", ".mha")
LOOPBACK_HOSTS = ("127.0.0.1", "localhost", "::1")
TOKEN_COOKIE = "isdnet_token"
SAFE_NAME = re.compile(r"[^A-Za-z0-9_.-]+")


class WorkspaceError(ValueError):
    """A path outside the workspace, or a file the app refuses; the message is shown to the user."""


def is_loopback(host: str) -> bool:
    """True for the loopback names and addresses (the only interfaces served without a token)."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def check_serving(host: str, token: Optional[str]) -> None:
    """Refuse to listen beyond loopback without an access token."""
    if not is_loopback(host) and not token:
        raise WorkspaceError(f"serving on {host} (not loopback) needs an access token: give --token or set "
                             "ISDNET_WEB_TOKEN")
    if token is not None and len(token) < 16:
        raise WorkspaceError("the access token must have at least 16 characters")


def image_ending(name: str) -> Optional[str]:
    """The accepted ending of a file name (``.nii.gz``, ``.seg.nrrd``, ...), None when not accepted."""
    lower = name.lower()
    return next((ending for ending in IMAGE_ENDINGS if lower.endswith(ending)), None)


def safe_file_name(name: str) -> str:
    """A client's file name reduced to one harmless path component keeping its image ending."""
    base = name.replace("\\", "/").rsplit("/", 1)[-1]
    ending = image_ending(base)
    if ending is None:
        raise WorkspaceError(f"'{base}': not an image this app reads (use {', '.join(IMAGE_ENDINGS)})")
    stem = SAFE_NAME.sub("_", base[:-len(ending)]).strip("._") or "upload"
    return stem[:100] + ending


@dataclass
class Workspace:
    """The one folder the app reads from and writes to; every path the browser names is resolved inside it."""

    root: Path

    def __post_init__(self) -> None:
        self.root = Path(self.root).expanduser().resolve()
        self.root.mkdir(parents=True, exist_ok=True)

    def resolve(self, relative: str) -> Path:
        """The workspace path named by ``relative``; raises WorkspaceError if it would leave the workspace."""
        if not relative or Path(relative).is_absolute():
            raise WorkspaceError(f"'{relative}': give a path relative to the workspace")
        path = (self.root / relative).resolve()
        if path != self.root and self.root not in path.parents:
            raise WorkspaceError(f"'{relative}' is outside the workspace")
        return path

    def relative(self, path: Path) -> str:
        """``path`` as the browser sees it: relative to the workspace, with forward slashes."""
        return Path(path).resolve().relative_to(self.root).as_posix()

    def folder(self, name: str) -> Path:
        """A folder the app writes to (uploads, datasets, models, segmentations), created on demand."""
        path = self.resolve(name)
        path.mkdir(parents=True, exist_ok=True)
        return path

    def files(self, endings: Iterable[str] = IMAGE_ENDINGS, limit: int = 500) -> list[str]:
        """Files under the workspace with one of ``endings``, relative and sorted; symlinks leading out are left out."""
        endings = tuple(endings)
        found = []
        for path in sorted(self.root.rglob("*")):
            if len(found) >= limit:
                break
            if not path.name.lower().endswith(endings) or not path.is_file():
                continue
            try:
                found.append(self.relative(path))
            except ValueError:
                continue  # a link to somewhere outside
        return found


@dataclass
class Upload:
    """One file sent by the browser, checked: a safe name and at most ``max_bytes``."""

    name: str
    content: bytes

    @classmethod
    def from_client(cls, file: dict[str, Any], max_bytes: int) -> Upload:
        """Check a trame file dictionary (name, size, content as bytes or chunks); raises WorkspaceError."""
        name = safe_file_name(str(file.get("name") or ""))
        declared = int(file.get("size") or 0)
        content = file.get("content")
        if isinstance(content, list):
            content = b"".join(content)
        if not isinstance(content, (bytes, bytearray)):
            raise WorkspaceError(f"'{name}': no file content arrived")
        if max(declared, len(content)) > max_bytes:
            raise WorkspaceError(f"'{name}' is larger than the upload limit of {max_bytes // 2**20} MiB")
        if not content:
            raise WorkspaceError(f"'{name}' is empty")
        return cls(name, bytes(content))

    def save(self, folder: Path) -> Path:
        """Write the file into ``folder`` without replacing another file; returns its path."""
        path = folder / self.name
        ending = image_ending(self.name) or ""
        n = 2
        while path.exists():
            path = folder / f"{self.name[:-len(ending)]}_{n}{ending}"
            n += 1
        path.write_bytes(self.content)
        return path


Handler = Callable[[Any], Awaitable[Any]]


def access_middleware(token: Optional[str], loopback_only: bool) -> Callable[[Any, Handler], Awaitable[Any]]:
    """An aiohttp middleware: with ``token``, every request (page, assets, websocket) must carry it, as the
    ``token`` query parameter once (then a cookie is set) or as that cookie; served on loopback, requests must
    also name a loopback host (this stops DNS-rebinding pages from reaching the app)."""
    from aiohttp import web

    @web.middleware
    async def middleware(request: Any, handler: Handler) -> Any:
        if loopback_only and not is_loopback(request.url.host or ""):
            raise web.HTTPForbidden(text="ISDNet web: this server only answers to localhost addresses")
        if token is None:
            return await handler(request)
        offered = request.query.get("token")
        if offered is not None and hmac.compare_digest(offered.encode(), token.encode()):
            response = await handler(request)
            if hasattr(response, "set_cookie"):
                response.set_cookie(TOKEN_COOKIE, token, httponly=True, samesite="Strict")
            return response
        cookie = request.cookies.get(TOKEN_COOKIE)
        if cookie is not None and hmac.compare_digest(cookie.encode(), token.encode()):
            return await handler(request)
        raise web.HTTPUnauthorized(text="ISDNet web: open the address printed by 'isdnet-web', with its ?token=")

    return middleware
