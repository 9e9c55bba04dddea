"""Torch threads that wait passively: set for every engine process before torch loads, a user's own value kept."""

from __future__ import annotations

import json
import subprocess
import sys

from isdnet.threads import THREAD_ENVIRONMENT, wait_passively
from ISDNetLib.runner import engine_environment

PROBE = """
import json, os, sys
from isdnet import cli
torch_before = "torch" in sys.modules
status = cli.main(["segment", "missing.nii.gz", "--model", "missing.safetensors", "--out", "out"])
print(json.dumps(dict(torch_before=torch_before, status=status, policy=os.environ.get("OMP_WAIT_POLICY"))))
"""


def test_wait_passively_fills_only_what_is_unset():
    assert wait_passively({}) == {"OMP_WAIT_POLICY": "PASSIVE"}
    assert wait_passively({"OMP_WAIT_POLICY": "ACTIVE", "X": "1"}) == {"OMP_WAIT_POLICY": "ACTIVE", "X": "1"}


def test_engine_children_get_the_policy_unless_the_user_chose_one(monkeypatch):
    monkeypatch.delenv("OMP_WAIT_POLICY", raising=False)
    assert engine_environment()["OMP_WAIT_POLICY"] == "PASSIVE"
    monkeypatch.setenv("OMP_WAIT_POLICY", "ACTIVE")
    assert engine_environment()["OMP_WAIT_POLICY"] == "ACTIVE"


def run_probe(env: dict[str, str]) -> dict:
    done = subprocess.run([sys.executable, "-c", PROBE], env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout.strip().splitlines()[-1])


def test_the_cli_sets_it_before_torch_loads(monkeypatch, tmp_path):
    monkeypatch.chdir(tmp_path)
    env = {k: v for k, v in engine_environment().items() if k not in THREAD_ENVIRONMENT}
    probe = run_probe(env)
    # Importing the CLI loads no torch, so the policy main() sets is the one torch's OpenMP reads when it loads.
    assert probe == dict(torch_before=False, status=2, policy="PASSIVE")
    assert run_probe({**env, "OMP_WAIT_POLICY": "ACTIVE"})["policy"] == "ACTIVE"
