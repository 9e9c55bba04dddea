"""The web page of ``ISDNetWebApp``: the volumes, training, segmentation and suggestion cards, and Slicer's views.

Every input binds one state key (``v_model``), the only state a client may change (``guard.bound_keys``); every
button calls one method of the app. Nothing is rendered as HTML from state: the chart is an image.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from trame.ui.vuetify3 import VAppLayout
from trame.widgets import html
from trame.widgets import vuetify3 as v3

from .security import IMAGE_ENDINGS

if TYPE_CHECKING:
    from .app import ISDNetWebApp


def build_page(app: ISDNetWebApp) -> Any:
    """The page: volumes, training and segmentation cards on the left, Slicer's views on the right."""
    with VAppLayout(app.server, fill_height=True) as ui:
        ui.root.theme = "dark"
        with v3.VAppBar(density="compact"):
            v3.VToolbarTitle("ISDNet: train and segment")
            html.Div("{{ message }}", id="message", classes="text-body-2 mx-4 text-truncate",
                     style=("{color: message_error ? '#ff6e6e' : '#9ccc65', maxWidth: '65vw'}",))
        with v3.VNavigationDrawer(permanent=True, width=420, location="left"):
            _data_card(app)
            _train_card(app)
            _segment_card(app)
            _suggest_card(app)
        with v3.VMain(style="height: 100vh"), html.Div(classes="d-flex fill-height", style="width: 100%"):
            app.layout_manager.initialize_layout_grid(ui)
    return ui


def _data_card(app: ISDNetWebApp) -> None:
    limit = app.options.max_upload_bytes
    with v3.VCard(title="1. Volumes", density="compact", classes="ma-2"), v3.VCardText():
        with v3.VBtnToggle(v_model=("load_kind",), mandatory=True, density="compact", divided=True,
                           classes="mb-2"):
            v3.VBtn("Image", value="image", id="kind-image")
            v3.VBtn("Label of selected volume", value="label", id="kind-label")
        upload = app.server.controller.trigger_name(app.upload)
        v3.VFileInput(  # one file a message, so that no message need be larger than the limit and a little
            label=f"Upload ({', '.join(IMAGE_ENDINGS)}; up to {limit // 2**20} MiB)", multiple=True,
            density="compact", id="upload", prepend_icon="mdi-upload", hide_details=True, classes="mb-2",
            change=(f"Array.from($event.target.files).forEach(f => f.size <= {limit} ? "
                    f"trigger('{upload}', [[f], []]) : trigger('{upload}', [[], [f.name]]))"))
        with html.Div(classes="d-flex align-center"):
            v3.VSelect(label="Workspace file", items=("workspace_files",), v_model=("workspace_file",),
                       density="compact", hide_details=True, id="workspace-file",
                       update_menu=(app.refresh_lists, "[$event]"))
            v3.VBtn("Load", click=app.load_workspace_file, id="load-file", classes="ml-2")
        with v3.VList(density="compact", classes="mt-2", id="volume-list"):
            with v3.VListItem(v_for="v in volumes", key="v.id", value=("v.id",),
                              active=("current_volume === v.id",), click=(app.select_volume, "[v.id]")):
                v3.VListItemTitle("{{ v.name }}")
                v3.VListItemSubtitle("{{ v.label ? 'label: ' + v.label : 'no label' }}"
                                     "{{ v.segmented ? ' · segmented' : '' }}")
                with v3.VBtnToggle(model_value=("v.role",), mandatory=True, density="compact",
                                   divided=True, variant="outlined",
                                   update_modelValue=(app.set_role, "[v.id, $event]")):
                    for role in ("labeled", "unlabeled", "skip"):
                        v3.VBtn(role, value=role, size="x-small")


def _train_card(app: ISDNetWebApp) -> None:
    with v3.VCard(title="2. Train", density="compact", classes="ma-2"), v3.VCardText():
        with html.Div(classes="d-flex"):
            v3.VTextField(label="Model name", v_model=("model_name",), density="compact", hide_details=True,
                          id="model-name")
            v3.VSelect(label="Method", items=("methods",), v_model=("method",), density="compact",
                       hide_details=True, classes="mx-2")
            v3.VTextField(label="Epochs", v_model_number=("epochs",), type="number", density="compact",
                          hide_details=True, id="epochs", style="max-width: 80px")
        with html.Div(classes="d-flex my-2"):
            v3.VBtn("Train", click=app.train, color="primary", id="train",
                    disabled=("train_state === 'running'",))
            v3.VBtn("Stop", click=app.stop_training, color="error", id="stop", classes="ml-2",
                    disabled=("train_state !== 'running'",))
        v3.VProgressLinear(model_value=("train_progress",), height=18, color="primary", id="train-progress",
                           children=["{{ train_text || train_state }}"])
        html.Img(src=("chart",), classes="mt-2", id="chart")  # an image: nothing in it runs as the page


def _segment_card(app: ISDNetWebApp) -> None:
    with v3.VCard(title="3. Segment", density="compact", classes="ma-2"), v3.VCardText():
        v3.VSelect(label="Model", items=("models",), v_model=("model",), density="compact",
                   hide_details=True, id="model", update_menu=(app.refresh_lists, "[$event]"))
        with html.Div(classes="d-flex align-center my-2"):
            v3.VBtn("Segment selected volume", click=app.segment, color="primary", id="segment",
                    disabled=("segment_state === 'running' || !current_volume || !model",))
        v3.VSwitch(label="Show the confidence map", v_model=("show_confidence",), density="compact",
                   hide_details=True, id="confidence", disabled=("!has_confidence",))
        v3.VProgressLinear(model_value=("segment_progress",), height=6, color="secondary",
                           active=("segment_state === 'running'",))
        with html.Div(classes="d-flex mt-2"):
            v3.VBtn(".seg.nrrd", prepend_icon="mdi-download", id="download-segmentation",
                    disabled=("!has_result",),
                    click=(f"utils.download(seg_file_name, trigger('"
                           f"{app.server.controller.trigger_name(app.download_segmentation)}'), "
                           "'application/octet-stream')"))
            v3.VBtn("Model", prepend_icon="mdi-download", id="download-model", classes="ml-2",
                    disabled=("!model",),
                    click=(f"utils.download(model_file_name, trigger('"
                           f"{app.server.controller.trigger_name(app.download_model)}'), "
                           "'application/octet-stream')"))


def _suggest_card(app: ISDNetWebApp) -> None:
    """Which unlabeled volume to annotate next, by the chosen model: a ranked list (text only, never HTML)."""
    with v3.VCard(title="4. Suggest next volume to annotate", density="compact", classes="ma-2"), v3.VCardText():
        v3.VBtn("Suggest next", click=app.suggest, color="primary", id="suggest",
                disabled=("suggest_state === 'running' || !model",))
        v3.VProgressLinear(indeterminate=True, height=4, color="secondary", classes="mt-2",
                           active=("suggest_state === 'running'",))
        html.Div("{{ suggest_text }}", id="suggest-text", classes="text-body-2 mt-2")
        with v3.VList(density="compact", id="suggestions"):
            with v3.VListItem(v_for="s in suggestions", key="s.id", click=(app.select_volume, "[s.id]")):
                v3.VListItemTitle("{{ s.rank }}. {{ s.name }}")
                v3.VListItemSubtitle("{{ s.strategy }} score {{ s.score }}")
