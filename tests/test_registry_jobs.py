"""The evaluation and the registry along the full path, around the ONE short job on the
shared stack that tests/test_job_path.py reads too (conftest's ``digits_job``): the version
it registers and its tags, `selfsup eval` reproducing the job's numbers on the same split,
promotion rules, `encoder get` loading in a fresh process without the training code, clear
errors for unknown or broken encoders, and unlabelled data."""

from __future__ import annotations

import importlib.metadata
import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from mlflow.tracking import MlflowClient

import selfsup
from pipelines import tags
from pipelines.registry import register_encoder
from pipelines.spec import EncoderSpec
from service.registry import (
    PromotionRefused,
    Reference,
    Registry,
    RegistryNotFound,
    metric_value,
)
from tests.conftest import DIGITS_MODEL, Stack
from workers.encoders import build_encoder
from workers.export import EncoderLoadError, save_encoder

MODEL = DIGITS_MODEL


def test_the_job_evaluates_registers_and_tags_its_version(stack: Stack, digits_job: dict) -> None:
    client = MlflowClient(stack.tracking_uri)
    run = client.get_run(digits_job["mlflow_run_id"])
    metrics = run.data.metrics
    for subject in ("eval", "baseline.raw", "baseline.random"):
        assert 0.1 < metrics[f"{subject}.linear.top1"] <= 1.0
        assert 0.1 < metrics[f"{subject}.knn.top1"] <= 1.0
        assert 0.1 < metrics[f"{subject}.semi.0.1.linear.top1.mean"] <= 1.0
    assert "eval.semi.0.1.finetune.top1.mean" in metrics
    assert "baseline.raw.semi.0.1.finetune.top1.mean" not in metrics  # nothing to fine-tune
    evaluation = ("eval.", "baseline.")
    evaluated = {k: v for k, v in digits_job["result"].items() if k.startswith(evaluation)}
    assert evaluated == {k: v for k, v in metrics.items() if k.startswith(evaluation)}
    artifacts = {item.path for item in client.list_artifacts(run.info.run_id, "eval")}
    assert artifacts == {
        f"eval/{name}"
        for name in (
            "features_pca.png",
            "knn_confusion.png",
            "accuracy_vs_labels.png",
            "split.json",
        )
    }

    (version,) = digits_job["versions"]  # as listed right after the job
    version_tags = version["tags"]
    assert version["aliases"] == "candidate" and version["run_id"] == run.info.run_id
    assert version["metrics"]["eval.linear.top1"] == pytest.approx(metrics["eval.linear.top1"])
    assert version_tags[tags.JOB_ID] == digits_job["id"]
    assert version_tags["selfsup.method"] == "simclr"
    assert version_tags["selfsup.dataset"] == "builtin:digits"
    assert version_tags["selfsup.config_hash"] == digits_job["spec"].config_hash()
    release = re.escape(importlib.metadata.version("selfsup"))
    assert re.fullmatch(release + r"(\+g[0-9a-f]{12}(\.dirty)?)?", version_tags[tags.CODE_VERSION])
    assert version_tags[tags.SPLIT_DIGEST] == run.data.tags[tags.SPLIT_DIGEST]
    for key in ("eval.linear.top1", "eval.knn.top1", "eval.semi.0.1.finetune.top1.mean"):
        assert float(version_tags[key]) == pytest.approx(metrics[key], abs=1e-6)
    assert "simclr" in version["description"] and "3 epochs" in version["description"]

    table = digits_job["table"]  # `selfsup job status ID`: one compact table, one row per network
    assert re.search(r"linear\s+knn\s+10% lin\s+10% ft", table)
    encoder_row = next(line for line in table.splitlines() if line.strip().startswith("encoder"))
    assert f"{metrics['eval.linear.top1']:.3f}" in encoder_row
    assert "raw pixels" in table and "random init" in table and "eval." not in table


def test_selfsup_eval_reproduces_the_jobs_numbers_on_the_same_split(
    stack: Stack, digits_job: dict
) -> None:
    result = stack.cli("eval", f"{MODEL}@candidate", "--protocol", "linear", "-o", "json")
    assert result.returncode == 0, result.stderr[-3000:]
    evaluation = json.loads(result.stdout)
    job_metrics = MlflowClient(stack.tracking_uri).get_run(digits_job["mlflow_run_id"]).data.metrics
    for key in ("eval.linear.top1", "baseline.raw.linear.top1", "baseline.random.linear.top1"):
        assert evaluation["metrics"][key] == job_metrics[key], key
    assert set(evaluation["metrics"]) == {
        f"{subject}.linear.{k}"
        for subject in ("eval", "baseline.raw", "baseline.random")
        for k in ("top1", "top5")
    }
    version = Registry(stack.tracking_uri).resolve(Reference(MODEL, version="1"))
    assert evaluation["split"]["digest"] == version.tags[tags.SPLIT_DIGEST]

    client = MlflowClient(stack.tracking_uri)
    run = client.get_run(evaluation["run_id"])  # its own run, linked to the model version
    assert run.data.tags[tags.MODEL_NAME] == MODEL and run.data.tags[tags.MODEL_VERSION] == "1"
    assert run.info.run_id != digits_job["mlflow_run_id"] and run.info.status == "FINISHED"
    linked = client.get_logged_model(version.model_id).metrics
    assert {metric.key for metric in linked} >= {"eval.linear.top1"}


def test_promotion_refuses_a_worse_version_unless_forced(stack: Stack, digits_job: dict) -> None:
    registry, champion = Registry(stack.tracking_uri), Reference(MODEL, alias="champion")
    first = metric_value(registry.resolve(Reference(MODEL, version="1")), "eval.linear.top1")
    client = MlflowClient(stack.tracking_uri)
    experiment_id = client.get_run(digits_job["mlflow_run_id"]).info.experiment_id
    run_id = client.create_run(experiment_id).info.run_id
    encoder_dir = stack.home / "random-encoder"
    save_encoder(encoder_dir, build_encoder(EncoderSpec().config(in_channels=1, image_size=8)))
    worse = f"{first - 0.1:.6f}"
    for version_tags in ({"eval.linear.top1": worse}, {}):  # versions 2 and 3 (unscored)
        register_encoder(
            stack.tracking_uri, run_id, encoder_dir, MODEL, "candidate", version_tags, "test"
        )

    assert registry.promote(MODEL, "1", "champion", "eval.linear.top1").previous_version is None
    refused = stack.cli("encoder", "promote", MODEL, "2", "--alias", "champion")
    assert refused.returncode == 4 and "Traceback" not in refused.stderr
    assert f"{float(worse):.4f} < {first:.4f} (version 1)" in refused.stderr
    assert registry.resolve(champion).version == "1"
    with pytest.raises(PromotionRefused, match="has no eval.linear.top1 to compare"):
        registry.promote(MODEL, "3", "champion", "eval.linear.top1")

    forced = stack.cli("encoder", "promote", MODEL, "2", "--force", check=True)
    assert "version 2" in forced.stdout and "[forced]" in forced.stdout
    assert registry.resolve(champion).version == "2"
    # Version 1 beats the champion it would replace: no force needed.
    promotion = registry.promote(MODEL, "1", "champion", "eval.linear.top1")
    assert (promotion.previous_version, promotion.forced) == ("2", False)
    aliases = {view.version: view.aliases for view in registry.versions(MODEL)}
    assert aliases == {"1": ["champion"], "2": [], "3": ["candidate"]}

    table = stack.cli("encoder", "list", MODEL, check=True).stdout
    assert re.search(r"1\s+champion\s+simclr\s+builtin:digits\s+" + f"{first:.3f}", table)


def test_encoder_get_loads_in_a_fresh_process_without_the_training_code(
    stack: Stack, digits_job: dict, tmp_path: Path
) -> None:
    folder = tmp_path / "encoder"
    stack.cli("encoder", "get", f"{MODEL}/1", "-o", str(folder), check=True)
    files = {path.name for path in folder.iterdir()}
    assert files == {
        "encoder.json",
        "weights.safetensors",
        "selfsup.json",
        "README.md",
        "load_example.py",
    }
    assert json.loads((folder / "selfsup.json").read_text())["input_shape"] == [1, 8, 8]

    probe = (
        "import json, sys, torch, selfsup\n"
        f"encoder = selfsup.load_encoder({str(folder)!r})\n"
        "images = torch.linspace(0, 1, 4 * 64).reshape(4, 1, 8, 8)\n"
        "with torch.no_grad():\n"
        "    features = encoder(images)\n"
        "loaded = [m for m in sys.modules if m.split('.')[0] in ('ray', 'mlflow')\n"
        "          or m in ('workers.train_loop', 'pipelines.driver', 'pipelines.pretrain')]\n"
        "print(json.dumps({'features': features.tolist(), 'loaded': loaded}))\n"
    )
    fresh = subprocess.run(
        [sys.executable, "-c", probe], capture_output=True, text=True, timeout=120, check=True
    )
    report = json.loads(fresh.stdout)
    assert report["loaded"] == []
    registered = selfsup.load_encoder(f"models:/{MODEL}/1", tracking_uri=stack.tracking_uri)
    with torch.no_grad():
        expected = registered(torch.linspace(0, 1, 4 * 64).reshape(4, 1, 8, 8))
    assert torch.equal(torch.tensor(report["features"]), expected)

    example = subprocess.run(
        [sys.executable, str(folder / "load_example.py")],
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
    )
    assert "(4, 1, 8, 8) -> (4, 128)" in example.stdout


def test_unknown_and_broken_encoders_give_clear_errors(
    stack: Stack, digits_job: dict, tmp_path: Path
) -> None:
    for arguments, message in (
        (("encoder", "get", "no-such-model@champion", "-o", str(tmp_path / "a")), "no registered"),
        (("eval", f"{MODEL}@nightly"), "has no alias 'nightly'"),
    ):
        result = stack.cli(*arguments)
        assert result.returncode == 3, (arguments, result.stderr)
        assert message in result.stderr and "Traceback" not in result.stderr
    assert not (tmp_path / "a").exists()
    registry = Registry(stack.tracking_uri)
    with pytest.raises(RegistryNotFound, match=r"has no version 99 \(versions: 1"):
        registry.resolve(Reference(MODEL, version="99"))
    with pytest.raises(RegistryNotFound, match=f"registered: .*{MODEL}"):
        selfsup.load_encoder("models:/nothing@champion", tracking_uri=stack.tracking_uri)

    folder = tmp_path / "broken"
    save_encoder(folder, build_encoder(EncoderSpec().config(in_channels=1, image_size=8)))
    weights = folder / "weights.safetensors"
    weights.write_bytes(weights.read_bytes()[:100])  # truncated
    result = stack.cli("eval", str(folder), "--data", "builtin:digits")
    assert result.returncode == 2 and "cannot load the encoder" in result.stderr
    assert "Traceback" not in result.stderr

    config = json.loads((folder / "encoder.json").read_text())
    (folder / "encoder.json").write_text(json.dumps({**config, "format_version": 99}))
    with pytest.raises(EncoderLoadError, match="format_version 99"):
        selfsup.load_encoder(folder)


def test_the_driver_skips_label_based_evaluation_for_unlabelled_data(
    stack: Stack, digits_job: dict
) -> None:
    from pipelines import driver

    spec = digits_job["spec"].model_copy(deep=True)
    spec.data.source = "builtin:spiral"
    client = MlflowClient(stack.tracking_uri)
    experiment_id = client.get_run(digits_job["mlflow_run_id"]).info.experiment_id
    run_id = client.create_run(experiment_id).info.run_id
    encoder = build_encoder(EncoderSpec(arch="mlp", out_dim=16).config(2, 1))
    assert driver._evaluate(spec, encoder, None, client, run_id) is None
    note = client.get_run(run_id).data.tags[tags.EVAL_SKIPPED]
    assert "builtin:spiral has no labels" in note and "skipped" in note
    assert tags.EVAL_SKIPPED in driver._version_tags(spec, "job-x", None)
