"""What keeps the web app safe to serve: the workspace boundary, upload and volume checks, the access-token,
host and origin gate.

Nothing here imports trame or Slicer, so it is tested on its own.
"""

from __future__ import annotations

import collections
import hmac
import ipaddress
import os
import re
from collections.abc import Awaitable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Optional

from isdnet.detached import data_files
from isdnet.errors import InputError
from isdnet.images import IMAGE_BYTES_PER_VOXEL, LABEL_BYTES_PER_VOXEL, check_volume_file

IMAGE_ENDINGS = (".seg.nrrd", ".nii.gz", ".nii", ".nrrd", ".mha")
TOKEN_COOKIE = "isdnet_token"
TOKEN = re.compile(r"[!-~]{16,}")  # printable ASCII, no spaces
SAFE_NAME = re.compile(r"[^A-Za-z0-9_.-]+")
MAX_LISTED_ENTRIES = 20_000  # folder entries the workspace listing reads at the most, however large the tree


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
    if token is not None and not TOKEN.fullmatch(token):
        raise WorkspaceError("the access token must have at least 16 characters, printable and without spaces")


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
    """The one folder the app reads from and writes to. Every path is taken at its real location, links
    followed, and refused if that lies outside the workspace, before anything is read, written or deleted."""

    root: Path

    def __post_init__(self) -> None:
        self.root = Path(os.path.realpath(Path(self.root).expanduser()))
        self.root.mkdir(parents=True, exist_ok=True)

    def inside(self, path: Path) -> Path:
        """The real path of ``path`` (a workspace path, existing or not); WorkspaceError if it leads outside."""
        real = Path(os.path.realpath(path))
        if real != self.root and self.root not in real.parents:
            raise WorkspaceError(f"'{self._shown(path)}' leads outside the workspace")
        return real

    def resolve(self, relative: Any) -> Path:
        """The workspace path named by ``relative``; raises WorkspaceError if it would leave the workspace."""
        if not isinstance(relative, str) or not relative or Path(relative).is_absolute():
            raise WorkspaceError(f"'{relative}': give a path relative to the workspace")
        return self.inside(self.root / relative)

    def inside_tree(self, folder: Path) -> Path:
        """``inside(folder)``, and every entry below it too (links are not followed down, but none may lead out)."""
        real = self.inside(folder)
        for parent, folders, files in os.walk(real):
            for name in folders + files:
                self.inside(Path(parent) / name)
        return real

    def relative(self, path: Path) -> str:
        """``path`` as the browser sees it: relative to the workspace, with forward slashes."""
        return Path(os.path.realpath(path)).relative_to(self.root).as_posix()

    def _shown(self, path: Path) -> str:
        try:
            return Path(os.path.abspath(path)).relative_to(self.root).as_posix()
        except ValueError:
            return Path(path).name

    def folder(self, name: str) -> Path:
        """A folder the app writes to (uploads, datasets, models, segmentations), created on demand."""
        path = self.resolve(name)
        path.mkdir(parents=True, exist_ok=True)
        return path

    def files(self, endings: Iterable[str] = IMAGE_ENDINGS, limit: int = 500,
              max_entries: int = MAX_LISTED_ENTRIES) -> list[str]:
        """Regular files under the workspace with one of ``endings``, relative and sorted: at most ``limit`` of
        them, found among at most ``max_entries`` folder entries (a huge tree is listed in part, quickly). Hidden
        names are skipped, links are not followed."""
        endings = tuple(endings)
        found: list[str] = []
        folders, read = collections.deque([self.root]), 0
        while folders and len(found) < limit and read < max_entries:
            try:
                entries = os.scandir(folders.popleft())
            except OSError:
                continue  # a folder the app may not read
            with entries:
                for entry in entries:
                    read += 1
                    if entry.name.startswith(".") or entry.is_symlink():
                        pass
                    elif entry.is_dir(follow_symlinks=False):
                        folders.append(Path(entry.path))
                    elif entry.name.lower().endswith(endings) and entry.is_file(follow_symlinks=False):
                        found.append(self.relative(Path(entry.path)))
                    if read >= max_entries or len(found) >= limit:
                        break
        return sorted(found)


def check_volume(workspace: Workspace, path: Path, label: bool, uploaded: bool) -> None:
    """Refuse, before any reader decodes it, a volume file that is not a regular workspace file, that takes its
    voxels from other files (any, when uploaded; outside the workspace, otherwise), or that needs more memory
    than is free by its header's size (a small compressed file can announce gigabytes)."""
    real = workspace.inside(path)
    shown = workspace.relative(real)
    if not real.is_file():
        raise WorkspaceError(f"'{shown}' is not a file")
    try:
        for data in data_files(real):
            if uploaded:
                raise WorkspaceError(f"'{shown}' keeps its voxels in another file ({data.name}); upload a volume "
                                     "in one file (.nrrd, .nii.gz, .mha)")
            try:
                workspace.inside(data)
            except WorkspaceError:
                raise WorkspaceError(f"'{shown}' takes its voxels from {data.name}, outside the workspace") from None
        check_volume_file(real, LABEL_BYTES_PER_VOXEL if label else IMAGE_BYTES_PER_VOXEL)
    except InputError as error:
        raise WorkspaceError(f"'{shown}': {error.problem}") from None


@dataclass
class Upload:
    """One file sent by the browser, checked: a safe name and at most ``max_bytes``."""

    name: str
    content: bytes

    @classmethod
    def from_client(cls, file: Any, max_bytes: int) -> Upload:
        """Check a trame file dictionary (name, size, content as bytes or chunks); raises WorkspaceError."""
        if not isinstance(file, dict) or not isinstance(file.get("name"), str):
            raise WorkspaceError("an upload arrived malformed (not a named file)")
        name = safe_file_name(file["name"])
        declared = file.get("size") or 0
        content = file.get("content")
        if isinstance(content, list) and all(isinstance(part, (bytes, bytearray)) for part in content):
            content = b"".join(content)
        if not isinstance(content, (bytes, bytearray)) or not isinstance(declared, int):
            raise WorkspaceError(f"'{name}': no file content arrived")
        if max(declared, len(content)) > max_bytes:
            raise WorkspaceError(f"'{name}' is larger than the upload limit of {max_bytes // 2**20} MiB")
        if not content:
            raise WorkspaceError(f"'{name}' is empty")
        return cls(name, bytes(content))

    def save(self, folder: Path) -> Path:
        """Write the file into ``folder`` as a new file, never replacing another one nor writing through a link
        (a dangling one included); returns its path."""
        ending = image_ending(self.name) or ""
        for n in range(1, 10_000):
            path = folder / (self.name if n == 1 else f"{self.name[:-len(ending)]}_{n}{ending}")
            try:
                with open(path, "xb") as file:
                    file.write(self.content)
                return path
            except FileExistsError:
                continue
        raise WorkspaceError(f"'{self.name}': too many uploads of that name")


Handler = Callable[[Any], Awaitable[Any]]


def same_origin(origin: str, url: Any) -> bool:
    """True when a request's ``Origin`` header names the host and port the request was sent to (``url``)."""
    from yarl import URL

    try:
        sender = URL(origin)
    except ValueError:
        return False
    return (sender.scheme in ("http", "https") and sender.host is not None and url.host is not None
            and (sender.host.lower(), sender.port) == (url.host.lower(), url.port))


def access_middleware(token: Optional[str], loopback_only: bool) -> Callable[[Any, Handler], Awaitable[Any]]:
    """An aiohttp middleware: a request that a page of another origin sends (its ``Origin`` header names another
    host or port, or ``null``) is refused, always; with ``token``, every request (page, assets, websocket) must
    carry it, as the ``token`` query parameter once (then a cookie is set) or as that cookie; served on loopback,
    requests must also name a loopback host (this stops DNS-rebinding pages from reaching the app)."""
    from aiohttp import web

    @web.middleware
    async def middleware(request: Any, handler: Handler) -> Any:
        if loopback_only and not is_loopback(request.url.host or ""):
            raise web.HTTPForbidden(text="ISDNet web: this server only answers to localhost addresses")
        origin = request.headers.get("Origin")
        if origin is not None and not same_origin(origin, request.url):
            raise web.HTTPForbidden(text="ISDNet web: requests from the pages of other sites are refused")
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
