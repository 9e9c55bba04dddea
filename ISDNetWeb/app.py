"""The trame-slicer server: load volumes and labels, train, segment, and see the result in Slicer's views.

The page (``page.py``) is a thin layer over ``WebSession`` (and through it TrainLogic and SegmentLogic): every button
calls one method here, which calls the session, and a timer polls the logics and copies their status into the
page's state. The server hands the page a secret of its own launch, refuses requests from other sites' pages and
limits what a client may send (``guard``); stopping it stops the training and segmentation it started.
"""

from __future__ import annotations

import asyncio
import functools
import secrets
import sys
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

from aiohttp import web
from trame.app import get_server
from trame.decorators import TrameApp, change
from trame_slicer.core import LayoutManager, SlicerApp
from trame_slicer.rca_view import register_rca_factories
from trame_slicer.views import Layout, LayoutDirection, ViewLayoutDefinition

from isdnet.config import METHODS, MODEL_SUFFIX, SEGMENTATION_ENDING, TrainConfig
from isdnet.errors import ISDNetError
from ISDNetLib.suggestions import describe, suggestion_rows
from ISDNetLib.volumes import NodeError

from . import guard
from .chart import chart_image, training_chart
from .page import build_page
from .security import (
    Upload,
    Workspace,
    WorkspaceError,
    access_middleware,
    check_volume,
    is_loopback,
)
from .session import WebSession

POLL_S = 0.5
LAYOUT = "ISDNet"
# The views in page (DOM) order: axial and sagittal in the left column, 3D and coronal in the right one.
VIEW_ORDER = ("axial", "sagittal", "3D", "coronal")
# PNG keeps the views exact (and their colours checkable); trame-rca's PIL JPEG fallback garbles slice views here.
ENCODER = "png"
# Where trame's page script asks for its session (wslink's session manager, ``${document.baseURI}paraview/``):
# the answer gives it this launch's secret. Another site's page can neither read it nor pass the origin check.
SESSION_PATH = "/paraview/"
MESSAGE_OVERHEAD = 2**20  # bytes of a message beside the one uploaded file it may carry

DEFAULTS = TrainConfig()


@dataclass
class WebOptions:
    """How the app is served and what it may do."""

    workspace: Path
    host: str = "127.0.0.1"
    port: int = 8080
    token: Optional[str] = None
    max_upload_bytes: int = 512 * 2**20
    train_arguments: list[str] = field(default_factory=list)
    device: str = "auto"


def reports(method: Callable[..., Any]) -> Callable[..., Any]:
    """Show the errors a user can fix as the page's message instead of raising them into trame; any other error
    is one line on the page too, its traceback only in the server's output."""

    @functools.wraps(method)
    def wrapper(self: ISDNetWebApp, *args: Any, **kwargs: Any) -> Any:
        try:
            return method(self, *args, **kwargs)
        except (ISDNetError, NodeError, ValueError, OSError) as error:
            self.say(str(error), error=True)
        except Exception as error:  # noqa: BLE001 - a client's malformed call must not reach it as a traceback
            traceback.print_exc()
            self.say(f"{method.__name__.replace('_', ' ')} failed unexpectedly ({type(error).__name__}); the "
                     "server's output has the details", error=True)
        return None

    return wrapper


@TrameApp()
class ISDNetWebApp:
    """One server, one Slicer scene, one session."""

    def __init__(self, options: WebOptions, server: Any = None):
        self.server = server or get_server(client_type="vue3")
        self.options = options
        self.workspace = Workspace(options.workspace)
        self.slicer_app = SlicerApp()
        register_rca_factories(self.slicer_app.view_manager, self.server, rca_encoder=ENCODER)
        self.layout_manager = LayoutManager(self.slicer_app.scene, self.slicer_app.view_manager, self.server)
        views = {"axial": ViewLayoutDefinition.axial_view(), "sagittal": ViewLayoutDefinition.sagittal_view(),
                 "3D": ViewLayoutDefinition.threed_view(), "coronal": ViewLayoutDefinition.coronal_view()}
        left, right = ([views[name] for name in VIEW_ORDER[:2]], [views[name] for name in VIEW_ORDER[2:]])
        self.layout_manager.register_layout(LAYOUT, Layout(LayoutDirection.Horizontal, [
            Layout(LayoutDirection.Vertical, left), Layout(LayoutDirection.Vertical, right)]))
        self.layout_manager.set_layout(LAYOUT)
        self.session = WebSession(self.slicer_app.scene, self.slicer_app.volumes_logic, self.workspace,
                                  options.train_arguments, options.device)
        self.secret = secrets.token_urlsafe(32)  # the page's wslink secret, new at every launch
        self._writable: set[str] = set()  # the state keys a client may change, once the page's state is ready
        self._shown: Optional[tuple[str, str]] = None  # the volume and result the views were last fitted to
        self._chart_epochs: Optional[tuple[int, ...]] = None
        self._poll_task: Optional[asyncio.Task] = None
        self._init_state()
        self.ui = build_page(self)
        self.server.controller.on_server_bind.add(self._bind)
        self.server.controller.on_server_ready.add(self._ready)
        self.server.controller.on_server_exited.add(self._exited)

    @property
    def state(self) -> Any:
        return self.server.state

    # ----- life cycle
    def _bind(self, wslink_server: Any) -> None:
        """Gate every request, give the page its secret, and limit what a websocket client may send."""
        wslink_server.app.middlewares.append(
            access_middleware(self.options.token, loopback_only=is_loopback(self.options.host)))
        wslink_server.app.router.add_post(SESSION_PATH, self._session)
        self.server.protocol.updateSecret(self.secret)
        guard.install(wslink_server, self.options.max_upload_bytes + MESSAGE_OVERHEAD, self._writable)

    async def _session(self, _request: Any) -> Any:
        """The page's session: its websocket (on the host the page came from) and this launch's secret."""
        return web.json_response({"sessionURL": "ws://USE_HOST/ws", "secret": self.secret})

    def _exited(self, **_: Any) -> None:
        """The server stops (SIGTERM, Ctrl-C): end the training and segmentation it started."""
        self.session.close()

    def _ready(self, **_: Any) -> None:
        self._writable.update(guard.bound_keys(self.state.to_dict()))
        query = f"?token={self.options.token}" if self.options.token else ""
        host = f"[{self.options.host}]" if ":" in self.options.host else self.options.host
        print(f"ISDNet web: serving {self.workspace.root} on http://{host}:{self.server.port}/{query}", flush=True)
        self._poll_task = asyncio.get_event_loop().create_task(self._poll_forever())

    async def _poll_forever(self) -> None:
        while True:
            await asyncio.sleep(POLL_S)
            with self.state:
                try:
                    self._poll()
                except Exception as error:  # noqa: BLE001 - shown to the user; the page must keep updating
                    self.say(f"Following the progress failed: {error}", error=True)

    # ----- state
    def _init_state(self) -> None:
        s = self.state
        s.trame__title = "ISDNet"
        s.message, s.message_error = "Load volumes: upload them or pick files of the workspace.", False
        s.volumes, s.current_volume = [], None
        s.workspace_files, s.workspace_file = self.workspace.files(), None
        s.load_kind = "image"
        s.methods, s.method, s.epochs, s.model_name = list(METHODS), DEFAULTS.method, DEFAULTS.epochs, "model"
        s.train_state, s.train_progress, s.train_text = "idle", 0, ""
        s.chart = chart_image(training_chart({}))
        s.models, s.model = self.session.models(), None
        s.segment_state, s.segment_progress = "idle", 0
        s.show_confidence, s.has_result, s.has_confidence = False, False, False
        s.seg_file_name, s.model_file_name = f"segmentation{SEGMENTATION_ENDING}", f"model{MODEL_SUFFIX}"
        s.suggest_state, s.suggestions, s.suggest_text = "idle", [], ""
        if s.models:
            s.model = s.models[-1]

    def say(self, text: str, error: bool = False) -> None:
        """The one-line message under the title bar."""
        self.state.message, self.state.message_error = text, error

    @reports
    def refresh_lists(self, menu_open: bool = True) -> None:
        """Volumes, workspace files and models as they are now (called when a file menu opens)."""
        if menu_open:
            self._refresh_lists()

    @reports
    def select_volume(self, volume_id: Any) -> None:
        """Show a loaded volume (a click in the list)."""
        self.state.current_volume = self.session.entry(volume_id).node.GetID()

    def _refresh_lists(self) -> None:
        self.state.volumes = [entry.row() for entry in self.session.volumes.values()]
        self.state.workspace_files = self.workspace.files()
        self.state.models = self.session.models()

    # ----- loading
    @reports
    def upload(self, files: Any, refused: Any = None) -> None:
        """Files from the browser (the page sends one a call): checked, saved under uploads/ in the workspace,
        then loaded."""
        if refused:
            raise WorkspaceError(f"larger than the upload limit, not sent: {', '.join(map(str, refused))}"[:300])
        if not isinstance(files, list):
            raise WorkspaceError("an upload arrived malformed (not a list of files)")
        folder = self.workspace.folder("uploads")
        for file in files:
            upload = Upload.from_client(file, self.options.max_upload_bytes)
            path = upload.save(folder)
            try:
                self._load(path, f"upload: {upload.name}", uploaded=True)
            except (WorkspaceError, NodeError):
                path.unlink(missing_ok=True)
                raise

    @reports
    def load_workspace_file(self) -> None:
        """Load the chosen workspace file as an image or as the label of the selected volume."""
        if not self.state.workspace_file:
            raise WorkspaceError("choose a workspace file first")
        self._load(self.workspace.resolve(self.state.workspace_file), self.state.workspace_file)

    def _load(self, path: Path, source: str, uploaded: bool = False) -> None:
        check_volume(self.workspace, path, label=self.state.load_kind == "label", uploaded=uploaded)
        if self.state.load_kind == "label":
            entry = self.session.load_label(path, self.state.current_volume)
            self.say(f"'{path.name}' is now the label of '{entry.node.GetName()}'.")
            self._shown = None
        else:
            entry = self.session.load_image(path, source)
            self.state.current_volume = entry.node.GetID()
            self.say(f"Loaded '{entry.node.GetName()}' (unlabeled; load its label to use it as labeled).")
        self._refresh_lists()
        self._show()

    @reports
    def set_role(self, volume_id: str, role: str) -> None:
        """A volume's role in training: labeled, unlabeled or skip."""
        try:
            self.session.set_role(volume_id, role)
        finally:
            self._refresh_lists()  # a refused role springs back on the page

    # ----- training
    @reports
    def train(self) -> None:
        epochs = self.state.epochs
        if isinstance(epochs, bool) or not isinstance(epochs, (int, float)) or epochs != int(epochs) or epochs < 1:
            raise WorkspaceError(f"epochs must be a whole number of at least 1, not {str(epochs)[:40]!r}")
        model = self.session.start_training(str(self.state.model_name), str(self.state.method), int(epochs))
        self._chart_epochs = None  # redraw: a new training starts an empty chart
        self.say(f"Training {self.workspace.relative(model)}...")
        self._poll()

    @reports
    def stop_training(self) -> None:
        self.session.train.stop()
        self._poll()

    # ----- segmentation
    @reports
    def segment(self) -> None:
        if not self.state.model:
            raise WorkspaceError("choose a model first (train one, or put a .safetensors file in the workspace)")
        self.session.start_segmentation(self.state.current_volume, self.state.model)
        self.say(f"Segmenting '{self.session.entry(self.state.current_volume).node.GetName()}'...")
        self._poll()

    @reports
    def download_segmentation(self) -> Any:
        path = self.session.segmentation_file(self.state.current_volume)
        self.say(f"Segmentation written to {self.workspace.relative(path)} and sent to the browser.")
        return self.server.protocol.addAttachment(path.read_bytes())

    @reports
    def download_model(self) -> Any:
        path = self.session.model_path(str(self.state.model or ""))
        return self.server.protocol.addAttachment(path.read_bytes())

    # ----- suggested next
    @reports
    def suggest(self) -> None:
        """Rank the unlabeled volumes with the chosen model: which to annotate next."""
        if not self.state.model:
            raise WorkspaceError("choose a model first (train one, or put a .safetensors file in the workspace)")
        self.session.start_suggestion(self.state.model)
        self.state.suggest_state, self.state.suggestions, self.state.suggest_text = "running", [], ""
        self.say("Ranking the unlabeled volumes...")
        self._poll()

    # ----- progress
    def _poll(self) -> None:
        s = self.state
        train, segment = self.session.poll()
        if train.state != s.train_state and train.state in ("done", "stopped", "failed"):
            self.say(train.message, error=train.state == "failed")
            self._refresh_lists()
            if train.state == "done" and train.model_path:
                s.model = self.workspace.relative(Path(train.model_path))
        s.train_state, s.train_progress = train.state, round(100 * train.fraction, 1)
        s.train_text = train.describe() if train.state == "running" else train.state
        epochs = tuple(sorted(self.session.train.history))
        if epochs != self._chart_epochs:
            self._chart_epochs = epochs
            s.chart = chart_image(training_chart(self.session.train.history))
        if segment.state != s.segment_state and segment.state in ("done", "cancelled", "failed"):
            self.say(segment.message, error=segment.state == "failed")
            self._refresh_lists()
            self._show()
        s.segment_state, s.segment_progress = segment.state, round(100 * segment.fraction, 1)
        ranking = self.session.suggest.poll()
        if ranking.state != s.suggest_state and ranking.state in ("done", "cancelled", "failed"):
            s.suggestions = suggestion_rows(self.session.scene, ranking)
            s.suggest_text = describe(self.session.scene, ranking)  # one line, never the log
            self.say(s.suggest_text, error=ranking.state == "failed")
        s.suggest_state = ranking.state

    # ----- views
    @change("current_volume", "show_confidence")
    def _on_view_change(self, **_: Any) -> None:
        self._show()

    def _show(self) -> None:
        """The selected volume in the slice views, its segmentation in all views, its confidence on demand."""
        s = self.state
        entry = self.session.volumes.get(s.current_volume)
        s.has_result = bool(entry and entry.result is not None)
        s.has_confidence = bool(entry and entry.confidence is not None)
        if entry is None:
            return
        s.seg_file_name = f"{entry.node.GetName()}.seg.nrrd"
        s.model_file_name = Path(str(s.model or f"model{MODEL_SUFFIX}")).name
        display = self.slicer_app.display_manager
        display.show_volume_in_slice_background(entry.node)
        confidence = entry.confidence if s.show_confidence and s.has_confidence else None
        display.show_volume_in_slice_foreground(confidence)
        for view in self.slicer_app.view_manager.get_slice_views():
            view.set_foreground_opacity(0.5)
        for other in self.session.volumes.values():
            shown = other is entry
            for node in (other.label, other.result):
                if node is not None and node.GetDisplayNode() is not None:
                    node.GetDisplayNode().SetVisibility(shown and (node is other.result or other.result is None))
        shown = (entry.node.GetID(), entry.result.GetID() if entry.result is not None else "")
        if self._shown != shown:  # a new volume, or a first result to frame in 3D
            self._shown = shown
            display.reset_views()


def serve(options: WebOptions) -> None:
    """Build the app and serve it until interrupted."""
    sys.argv = sys.argv[:1]  # trame parses the command line too; ours is already parsed
    app = ISDNetWebApp(options)
    app.server.start(port=options.port, host=options.host, open_browser=False, show_connection_info=False,
                     timeout=0)
