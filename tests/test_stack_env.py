"""The embedded stack's head environment: the stack's own Ray token, never another cluster's
address."""

from __future__ import annotations

from pathlib import Path

import pytest

from service.config import StatePaths
from service.stack import head_env


def test_head_env_drops_inherited_ray_address_and_sets_the_stack_token(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("RAY_ADDRESS", "192.0.2.9:6379")  # e.g. exported by an earlier ray.init()
    monkeypatch.setenv("RAY_AUTH_MODE", "disabled")
    paths = StatePaths(tmp_path)
    env = head_env(paths)
    assert "RAY_ADDRESS" not in env
    assert env["RAY_AUTH_MODE"] == "token"
    assert env["RAY_AUTH_TOKEN_PATH"] == str(tmp_path / "ray-auth-token")
    assert env["PATH"]  # everything else is inherited
