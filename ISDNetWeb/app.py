"""The trame-slicer page: load volumes and labels, train, segment, and see the result in Slicer's views.

The page is a thin layer over ``WebSession`` (and through it TrainLogic and SegmentLogic): every button calls one
session method, and a timer polls the logics and copies their status into the page's state.
"""

from __future__ import annotations

import asyncio
import functools
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

from trame.app import get_server
from trame.decorators import TrameApp, change
from trame.ui.vuetify3 import VAppLayout
from trame.widgets import html
from trame.widgets import vuetify3 as v3
from trame_slicer.core import LayoutManager, SlicerApp
from trame_slicer.rca_view import register_rca_factories
from trame_slicer.views import Layout, LayoutDirection, ViewLayoutDefinition

from isdnet.config import METHODS, MODEL_SUFFIX, SEGMENTATION_ENDING, TrainConfig
from ISDNetLib.volumes import NodeError

from .chart import training_chart
from .security import IMAGE_ENDINGS, Upload, Workspace, WorkspaceError, access_middleware, is_loopback
from .session import WebSession

POLL_S = 0.5
LAYOUT = "ISDNet"
# The views in page (DOM) order: axial and sagittal in the left column, 3D and coronal in the right one.
VIEW_ORDER = ("axial", "sagittal", "3D", "coronal")
# PNG keeps the views exact (and their colours checkable); trame-rca's PIL JPEG fallback garbles slice views here.
ENCODER = "png"

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
    """Show the errors a user can fix as the page's message instead of raising them into trame."""

    @functools.wraps(method)
    def wrapper(self: ISDNetWebApp, *args: Any, **kwargs: Any) -> Any:
        try:
            return method(self, *args, **kwargs)
        except (WorkspaceError, NodeError, ValueError, OSError) as error:
            self.say(str(error), error=True)
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
        self._shown: Optional[tuple[str, str]] = None  # the volume and result the views were last fitted to
        self._chart_epochs: Optional[tuple[int, ...]] = None
        self._poll_task: Optional[asyncio.Task] = None
        self._init_state()
        self._build_ui()
        self.server.controller.on_server_bind.add(self._bind)
        self.server.controller.on_server_ready.add(self._ready)
        self.server.controller.on_server_exited.add(self.session.close)

    @property
    def state(self) -> Any:
        return self.server.state

    # ----- life cycle
    def _bind(self, wslink_server: Any) -> None:
        wslink_server.app.middlewares.append(
            access_middleware(self.options.token, loopback_only=is_loopback(self.options.host)))

    def _ready(self, **_: Any) -> None:
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
        s.chart_svg = training_chart({})
        s.models, s.model = self.session.models(), None
        s.segment_state, s.segment_progress = "idle", 0
        s.show_confidence, s.has_result, s.has_confidence = False, False, False
        s.seg_file_name, s.model_file_name = f"segmentation{SEGMENTATION_ENDING}", f"model{MODEL_SUFFIX}"
        if s.models:
            s.model = s.models[-1]

    def say(self, text: str, error: bool = False) -> None:
        """The one-line message under the title bar."""
        self.state.message, self.state.message_error = text, error

    def refresh_lists(self, menu_open: bool = True) -> None:
        """Volumes, workspace files and models as they are now (called when a file menu opens)."""
        if menu_open:
            self._refresh_lists()

    def _refresh_lists(self) -> None:
        self.state.volumes = [entry.row() for entry in self.session.volumes.values()]
        self.state.workspace_files = self.workspace.files()
        self.state.models = self.session.models()

    # ----- loading
    @reports
    def upload(self, files: list[dict[str, Any]], refused: Optional[list[str]] = None) -> None:
        """Files from the browser: checked, saved under uploads/ in the workspace, then loaded."""
        if refused:
            raise WorkspaceError(f"larger than the upload limit, not sent: {', '.join(map(str, refused))}")
        folder = self.workspace.folder("uploads")
        for file in files or []:
            upload = Upload.from_client(file, self.options.max_upload_bytes)
            path = upload.save(folder)
            try:
                self._load(path, f"upload: {upload.name}")
            except (WorkspaceError, NodeError):
                path.unlink(missing_ok=True)
                raise

    @reports
    def load_workspace_file(self) -> None:
        """Load the chosen workspace file as an image or as the label of the selected volume."""
        if not self.state.workspace_file:
            raise WorkspaceError("choose a workspace file first")
        self._load(self.workspace.resolve(self.state.workspace_file), self.state.workspace_file)

    def _load(self, path: Path, source: str) -> None:
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
        model = self.session.start_training(str(self.state.model_name), str(self.state.method),
                                            int(self.state.epochs))
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
            s.chart_svg = training_chart(self.session.train.history)
        if segment.state != s.segment_state and segment.state in ("done", "cancelled", "failed"):
            self.say(segment.message, error=segment.state == "failed")
            self._refresh_lists()
            self._show()
        s.segment_state, s.segment_progress = segment.state, round(100 * segment.fraction, 1)

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

    # ----- page
    def _build_ui(self) -> None:
        with VAppLayout(self.server, fill_height=True) as self.ui:
            self.ui.root.theme = "dark"
            with v3.VAppBar(density="compact"):
                v3.VToolbarTitle("ISDNet: train and segment")
                html.Div("{{ message }}", id="message", classes="text-body-2 mx-4 text-truncate",
                         style=("{color: message_error ? '#ff6e6e' : '#9ccc65', maxWidth: '65vw'}",))
            with v3.VNavigationDrawer(permanent=True, width=420, location="left"):
                self._data_card()
                self._train_card()
                self._segment_card()
            with v3.VMain(style="height: 100vh"), html.Div(classes="d-flex fill-height", style="width: 100%"):
                self.layout_manager.initialize_layout_grid(self.ui)

    def _data_card(self) -> None:
        limit = self.options.max_upload_bytes
        with v3.VCard(title="1. Volumes", density="compact", classes="ma-2"), v3.VCardText():
            with v3.VBtnToggle(v_model=("load_kind",), mandatory=True, density="compact", divided=True,
                               classes="mb-2"):
                v3.VBtn("Image", value="image", id="kind-image")
                v3.VBtn("Label of selected volume", value="label", id="kind-label")
            v3.VFileInput(
                label=f"Upload ({', '.join(IMAGE_ENDINGS)}; up to {limit // 2**20} MiB)", multiple=True,
                density="compact", id="upload", prepend_icon="mdi-upload", hide_details=True, classes="mb-2",
                change=(f"trigger('{self.server.controller.trigger_name(self.upload)}', "
                        f"[Array.from($event.target.files).filter(f => f.size <= {limit}), "
                        f"Array.from($event.target.files).filter(f => f.size > {limit}).map(f => f.name)])"))
            with html.Div(classes="d-flex align-center"):
                v3.VSelect(label="Workspace file", items=("workspace_files",), v_model=("workspace_file",),
                           density="compact", hide_details=True, id="workspace-file",
                           update_menu=(self.refresh_lists, "[$event]"))
                v3.VBtn("Load", click=self.load_workspace_file, id="load-file", classes="ml-2")
            with v3.VList(density="compact", classes="mt-2", id="volume-list"):
                with v3.VListItem(v_for="v in volumes", key="v.id", value=("v.id",),
                                  active=("current_volume === v.id",), click="current_volume = v.id"):
                    v3.VListItemTitle("{{ v.name }}")
                    v3.VListItemSubtitle("{{ v.label ? 'label: ' + v.label : 'no label' }}"
                                         "{{ v.segmented ? ' · segmented' : '' }}")
                    with v3.VBtnToggle(model_value=("v.role",), mandatory=True, density="compact",
                                       divided=True, variant="outlined",
                                       update_modelValue=(self.set_role, "[v.id, $event]")):
                        for role in ("labeled", "unlabeled", "skip"):
                            v3.VBtn(role, value=role, size="x-small")

    def _train_card(self) -> None:
        with v3.VCard(title="2. Train", density="compact", classes="ma-2"), v3.VCardText():
            with html.Div(classes="d-flex"):
                v3.VTextField(label="Model name", v_model=("model_name",), density="compact", hide_details=True,
                              id="model-name")
                v3.VSelect(label="Method", items=("methods",), v_model=("method",), density="compact",
                           hide_details=True, classes="mx-2")
                v3.VTextField(label="Epochs", v_model_number=("epochs",), type="number", density="compact",
                              hide_details=True, id="epochs", style="max-width: 80px")
            with html.Div(classes="d-flex my-2"):
                v3.VBtn("Train", click=self.train, color="primary", id="train",
                        disabled=("train_state === 'running'",))
                v3.VBtn("Stop", click=self.stop_training, color="error", id="stop", classes="ml-2",
                        disabled=("train_state !== 'running'",))
            v3.VProgressLinear(model_value=("train_progress",), height=18, color="primary", id="train-progress",
                               children=["{{ train_text || train_state }}"])
            html.Div(v_html=("chart_svg",), classes="mt-2", id="chart")

    def _segment_card(self) -> None:
        with v3.VCard(title="3. Segment", density="compact", classes="ma-2"), v3.VCardText():
            v3.VSelect(label="Model", items=("models",), v_model=("model",), density="compact",
                       hide_details=True, id="model", update_menu=(self.refresh_lists, "[$event]"))
            with html.Div(classes="d-flex align-center my-2"):
                v3.VBtn("Segment selected volume", click=self.segment, color="primary", id="segment",
                        disabled=("segment_state === 'running' || !current_volume || !model",))
            v3.VSwitch(label="Show the confidence map", v_model=("show_confidence",), density="compact",
                       hide_details=True, id="confidence", disabled=("!has_confidence",))
            v3.VProgressLinear(model_value=("segment_progress",), height=6, color="secondary",
                               active=("segment_state === 'running'",))
            with html.Div(classes="d-flex mt-2"):
                v3.VBtn(".seg.nrrd", prepend_icon="mdi-download", id="download-segmentation",
                        disabled=("!has_result",),
                        click=(f"utils.download(seg_file_name, trigger('"
                               f"{self.server.controller.trigger_name(self.download_segmentation)}'), "
                               "'application/octet-stream')"))
                v3.VBtn("Model", prepend_icon="mdi-download", id="download-model", classes="ml-2",
                        disabled=("!model",),
                        click=(f"utils.download(model_file_name, trigger('"
                               f"{self.server.controller.trigger_name(self.download_model)}'), "
                               "'application/octet-stream')"))


def serve(options: WebOptions) -> None:
    """Build the app and serve it until interrupted."""
    sys.argv = sys.argv[:1]  # trame parses the command line too; ours is already parsed
    app = ISDNetWebApp(options)
    app.server.start(port=options.port, host=options.host, open_browser=False, show_connection_info=False,
                     timeout=0)
