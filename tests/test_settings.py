"""The controller's settings refuse storage locations it could not use, or that would put a
credential in job payloads, with the setting named."""

from __future__ import annotations

from pathlib import Path

import pytest

from service.settings import SettingsError, load_settings

REQUIRED = {
    "SELFSUP_STORE_URL": "sqlite:////tmp/jobs.db",
    "SELFSUP_TRACKING_URI": "sqlite:////tmp/mlflow.db",
    "SELFSUP_RAY_DASHBOARD_URL": "http://127.0.0.1:8265",
}


@pytest.mark.parametrize("storage", ["/srv/runs", "s3://bucket", "s3://bucket/runs/"])
def test_checkpoints_go_to_a_folder_or_an_s3_prefix(storage: str) -> None:
    settings = load_settings(env={**REQUIRED, "SELFSUP_STORAGE_PATH": storage})
    assert settings.storage_path == storage


@pytest.mark.parametrize(
    ("setting", "value", "problem"),
    [
        ("STORAGE_PATH", "runs", "neither an absolute folder"),
        ("STORAGE_PATH", "gs://bucket/runs", "checkpoints go to a folder or to s3"),
        ("STORAGE_PATH", "s3:///runs", "checkpoints go to a folder or to s3"),
        ("STORAGE_PATH", "s3://AKIA:secret@bucket/runs", "carries credentials"),
        ("ARTIFACT_ROOT", "s3://bucket/mlflow?X-Amz-Credential=AKIA", "carries credentials"),
    ],
)
def test_unusable_locations_are_refused_by_name(setting: str, value: str, problem: str) -> None:
    env = {**REQUIRED, "SELFSUP_STORAGE_PATH": "/srv/runs", f"SELFSUP_{setting}": value}
    with pytest.raises(SettingsError) as refused:
        load_settings(env=env)
    assert setting.lower() in str(refused.value) and problem in str(refused.value)
    assert "secret" not in str(refused.value) and "AKIA" not in str(refused.value)


def test_fair_share_weights_come_from_the_file_or_the_environment(tmp_path: Path) -> None:
    config = tmp_path / "server.yaml"
    config.write_text("fair_share_per_worker: 0.5\nuser_weights: {alice: 2}\n")
    env = {**REQUIRED, "SELFSUP_STORAGE_PATH": str(tmp_path / "runs")}
    from_file = load_settings(config, env=env)
    assert from_file.user_weights == {"alice": 2.0} and from_file.fair_share_per_worker == 0.5
    from_env = load_settings(env={**env, "SELFSUP_USER_WEIGHTS": '{"bob": 3}'})
    assert from_env.user_weights == {"bob": 3.0}
    with pytest.raises(SettingsError, match="user_weights"):
        load_settings(env={**env, "SELFSUP_USER_WEIGHTS": '{"bob": 0}'})
