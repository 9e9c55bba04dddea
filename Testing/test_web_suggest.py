"""The web app's "Suggest next": through the real server and its websocket (``web_client``), phantoms loaded, a tiny
model trained, the unlabeled volumes ranked by the same SuggestLogic, and nothing of it writable by a client."""

from __future__ import annotations

import asyncio
import time

import pytest
from test_web_attacks import TINY, authenticated, run
from web_client import Server, WslinkClient, trigger_names

from isdnet.config import DEFAULT_RANK_STRATEGY, RANK_DEFAULT_REASON
from isdnet.phantoms import write_phantom_dataset
from isdnet.rank import rank_images


@pytest.fixture
def served(tmp_path):
    """A running server on a workspace with four phantoms; yields (url, workspace)."""
    workspace = tmp_path / "workspace"
    write_phantom_dataset(workspace / "phantoms", 4, shape=(12, 48, 48))
    server = Server(workspace, "--train-options", TINY)
    try:
        yield server.url(), workspace
    finally:
        server.stop()


async def wait_state(client: WslinkClient, key: str, done: tuple[str, ...], timeout_s: float) -> dict:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        state = await client.state()
        if state[key] in done:
            return state
        await asyncio.sleep(0.5)
    raise AssertionError(f"{key} did not reach {done} in {timeout_s:.0f} s: {state[key]!r}, {state['message']!r}")


def test_suggest_next_ranks_the_unlabeled_volumes_with_the_trained_model(served):
    url, workspace = served
    unlabeled = ["phantom_002", "phantom_003"]

    async def scenario() -> None:
        client, attacker = await authenticated(url), await authenticated(url)
        try:
            state = await client.state()
            names = trigger_names(state)
            assert state["suggestions"] == [] and "v-html" not in state["trame__template_main"]
            answer = await client.trigger(names["suggest"])  # no model yet: one line, no traceback
            state = await client.state()
            assert "error" not in answer and state["message_error"] and state["message"].startswith("choose a model")
            for case in ("phantom_000", "phantom_001", *unlabeled):
                kinds = ("image", "label") if case not in unlabeled else ("image",)
                for kind, folder in zip(kinds, ("imagesTr", "labelsTr")):
                    await client.set_state(load_kind=kind, workspace_file=f"phantoms/{folder}/{case}.nii.gz")
                    await client.trigger(names["load-file"])
            await client.set_state(model_name="tiny", epochs=1)
            await client.trigger(names["train"])
            state = await wait_state(client, "train_state", ("done", "failed"), 300)
            assert state["train_state"] == "done", state["message"]
            assert state["model"] == "models/tiny.safetensors"

            await client.trigger(names["suggest"])
            state = await wait_state(client, "suggest_state", ("done", "failed"), 180)
            assert state["suggest_state"] == "done", state["message"]
            rows = state["suggestions"]
            images = [workspace / "phantoms" / "imagesTr" / f"{case}.nii.gz" for case in unlabeled]
            expected = rank_images(unlabeled, images, workspace / "models" / "tiny.safetensors", device="cpu")
            assert [(r["name"], r["rank"], r["strategy"]) for r in rows] == [
                (v.name, v.rank, DEFAULT_RANK_STRATEGY) for v in expected]
            assert [float(r["score"]) for r in rows] == pytest.approx([v.score for v in expected], abs=2e-3)
            assert state["suggest_text"] == state["message"] and not state["message_error"]
            assert state["message"].startswith(f"Annotate '{expected[0].name}' next. Ordered by "
                                               f"'{DEFAULT_RANK_STRATEGY}'")
            assert state["message"].endswith(RANK_DEFAULT_REASON)

            payload = "<img src=x onerror=alert(1)>"
            await attacker.set_state(suggestions=[{"name": payload, "rank": 1}], suggest_text=payload,
                                     suggest_state="idle")
            after = await client.state()
            assert (after["suggestions"], after["suggest_text"], after["suggest_state"]) == (
                rows, state["suggest_text"], "done"), "a client changed the list others see"
        finally:
            await client.close()
            await attacker.close()

    run(scenario())
