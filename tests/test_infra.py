"""infra/ checked offline: the compose file against the compose specification (vendored from
docker-compose 1.29.2's wheel, tests/fixtures/schemas/compose-spec.json), the KubeRay
manifests against a schema of the RayCluster and RayJob fields they use (KubeRay's CRDs are
in no package installable here; the fields follow KubeRay's API reference), and both for
agreement with the code: the settings names, the production stack's commands, and the
resources the controller's gang admission assumes."""

from __future__ import annotations

import json
import re
import shlex
from pathlib import Path

import jsonschema
import pytest
import yaml

from selfsup.cli import _parser
from service.config import StatePaths
from service.production import (
    BUCKET,
    MLFLOW_ADMIN,
    MLFLOW_SERVER_ENV,
    WORKER_RESOURCE,
    controller_settings,
    mlflow_server_args,
)
from service.settings import ENV_PREFIX, ServerSettings, load_settings

INFRA = Path(__file__).parent.parent / "infra"
COMPOSE = yaml.safe_load((INFRA / "compose" / "docker-compose.yaml").read_text())
RAY_CLUSTER = yaml.safe_load((INFRA / "kuberay" / "raycluster.yaml").read_text())
RAY_JOB = yaml.safe_load((INFRA / "kuberay" / "rayjob-evaluate.yaml").read_text())
COMPOSE_SPEC = json.loads(
    (Path(__file__).parent / "fixtures" / "schemas" / "compose-spec.json").read_text()
)

_STRING_MAP = {"type": "object", "additionalProperties": {"type": "string"}}
_QUANTITY = {"type": "string", "pattern": r"^[0-9]+(\.[0-9]+)?(m|Ki|Mi|Gi|Ti)?$"}
_RESOURCES = {
    "type": "object",
    "additionalProperties": False,
    "properties": {
        "requests": {"type": "object", "additionalProperties": _QUANTITY},
        "limits": {"type": "object", "additionalProperties": _QUANTITY},
    },
}
_CONTAINER = {
    "type": "object",
    "required": ["name", "image"],
    "additionalProperties": False,
    "properties": {
        "name": {"type": "string"},
        "image": {"type": "string"},
        "ports": {"type": "array"},
        "env": {"type": "array"},
        "envFrom": {"type": "array"},
        "resources": _RESOURCES,
    },
}
_POD_TEMPLATE = {
    "type": "object",
    "required": ["spec"],
    "properties": {
        "spec": {
            "type": "object",
            "required": ["containers"],
            "properties": {
                "containers": {"type": "array", "minItems": 1, "items": _CONTAINER},
                "tolerations": {"type": "array"},
            },
            "additionalProperties": False,
        }
    },
}
_RAY_CLUSTER_SPEC = {
    "type": "object",
    "required": ["headGroupSpec"],
    "additionalProperties": False,
    "properties": {
        "rayVersion": {"type": "string"},
        "enableInTreeAutoscaling": {"type": "boolean"},
        "autoscalerOptions": {"type": "object"},
        "authOptions": {
            "type": "object",
            "additionalProperties": False,
            "properties": {
                "mode": {"enum": ["disabled", "token"]},
                "secretName": {"type": "string"},
            },
        },
        "headGroupSpec": {
            "type": "object",
            "required": ["template"],
            "additionalProperties": False,
            "properties": {"rayStartParams": _STRING_MAP, "template": _POD_TEMPLATE},
        },
        "workerGroupSpecs": {
            "type": "array",
            "items": {
                "type": "object",
                "required": ["groupName", "template"],
                "additionalProperties": False,
                "properties": {
                    "groupName": {"type": "string"},
                    "replicas": {"type": "integer", "minimum": 0},
                    "minReplicas": {"type": "integer", "minimum": 0},
                    "maxReplicas": {"type": "integer", "minimum": 0},
                    "rayStartParams": _STRING_MAP,
                    "template": _POD_TEMPLATE,
                },
            },
        },
    },
}


def _resource(kind: str, spec: dict) -> dict:
    return {
        "type": "object",
        "required": ["apiVersion", "kind", "metadata", "spec"],
        "properties": {
            "apiVersion": {"const": "ray.io/v1"},
            "kind": {"const": kind},
            "metadata": {"type": "object", "required": ["name"]},
            "spec": spec,
        },
    }


RAY_CLUSTER_SCHEMA = _resource("RayCluster", _RAY_CLUSTER_SPEC)
RAY_JOB_SCHEMA = _resource(
    "RayJob",
    {
        "type": "object",
        "required": ["entrypoint", "rayClusterSpec"],
        "additionalProperties": False,
        "properties": {
            "entrypoint": {"type": "string"},
            "shutdownAfterJobFinishes": {"type": "boolean"},
            "ttlSecondsAfterFinished": {"type": "integer", "minimum": 0},
            "rayClusterSpec": _RAY_CLUSTER_SPEC,
        },
    },
)


def _flags(command: list[str]) -> dict[str, str]:
    """``--name=value`` arguments by name."""
    return dict(item.split("=", 1) for item in command if item.startswith("--") and "=" in item)


def _service_env(name: str) -> dict[str, str]:
    return {key: str(value) for key, value in COMPOSE["services"][name]["environment"].items()}


# ---- the schemas ------------------------------------------------------------------------


def test_the_compose_file_follows_the_compose_specification() -> None:
    errors = list(jsonschema.Draft201909Validator(COMPOSE_SPEC).iter_errors(COMPOSE))
    assert errors == [], [error.message for error in errors]


@pytest.mark.parametrize(
    ("document", "schema"), [(RAY_CLUSTER, RAY_CLUSTER_SCHEMA), (RAY_JOB, RAY_JOB_SCHEMA)]
)
def test_the_kuberay_manifests_follow_the_fields_of_their_crds(document: dict, schema: dict):
    errors = list(jsonschema.Draft202012Validator(schema).iter_errors(document))
    assert errors == [], [error.message for error in errors]


def test_the_schemas_catch_a_misspelt_field() -> None:
    """The checks above can fail: a typo in either file is refused."""
    broken = json.loads(json.dumps(COMPOSE))
    broken["services"]["controller"]["enviroment"] = {}
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.Draft201909Validator(COMPOSE_SPEC).validate(broken)
    broken = json.loads(json.dumps(RAY_CLUSTER))
    broken["spec"]["workerGroupSpecs"][0]["maxReplica"] = 3
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.Draft202012Validator(RAY_CLUSTER_SCHEMA).validate(broken)


# ---- compose against the code -------------------------------------------------------------


def test_the_controllers_variables_are_settings_and_cover_the_production_ones() -> None:
    env = _service_env("controller")
    named = {key.removeprefix(ENV_PREFIX).lower() for key in env if key.startswith(ENV_PREFIX)}
    assert named <= set(ServerSettings.model_fields), named - set(ServerSettings.model_fields)
    production = controller_settings(
        "sqlite:///x.db", "http://mlflow", "http://head", StatePaths(Path("/x"))
    ).model_dump(exclude_defaults=True)
    assert set(production) - {"driver_python"} <= named  # the image's Python is `python`
    # The compose values load as settings the way a container reads them.
    settings = load_settings(None, env={k: v.split("${")[0] or "x" for k, v in env.items()})
    assert settings.worker_resource == WORKER_RESOURCE
    assert settings.storage_path == production["storage_path"]


def test_mlflow_runs_the_production_stacks_command() -> None:
    mlflow = COMPOSE["services"]["mlflow"]
    flags = _flags(mlflow["command"])
    ours = _flags(mlflow_server_args("db", f"s3://{BUCKET}/mlflow"))
    assert flags["--app-name"] == ours["--app-name"]
    assert flags["--artifacts-destination"] == ours["--artifacts-destination"]
    assert flags["--backend-store-uri"].startswith("postgresql+psycopg://")
    assert "python -m service.production mlflow-auth-config" in mlflow["entrypoint"][2]
    env = _service_env("mlflow")
    assert env["MLFLOW_AUTH_CONFIG_PATH"] in mlflow["entrypoint"][2]
    assert MLFLOW_SERVER_ENV.items() <= env.items()
    assert _service_env("controller")["MLFLOW_TRACKING_USERNAME"] == MLFLOW_ADMIN


def test_ray_nodes_offer_what_train_workers_ask_for() -> None:
    head = _flags(COMPOSE["services"]["ray-head"]["command"])
    worker = COMPOSE["services"]["ray-worker"]
    flags = _flags(worker["command"])
    assert WORKER_RESOURCE not in head.get("--resources", "")
    offered = json.loads(flags["--resources"])
    assert offered == {WORKER_RESOURCE: float(flags["--num-cpus"])}
    assert float(worker["deploy"]["resources"]["limits"]["cpus"]) == float(flags["--num-cpus"])
    assert all(e["RAY_AUTH_MODE"] == "token" for e in map(_service_env, ("ray-head", "ray-worker")))


def test_no_secret_is_written_in_the_compose_file() -> None:
    """Passwords and keys come from the operator's environment: every value of a secret's
    variable is an interpolation, and no URL carries a password."""
    secret = re.compile(r"PASSWORD|SECRET|_KEY$")
    for name, service in COMPOSE["services"].items():
        for key, value in (service.get("environment") or {}).items():
            if secret.search(key) and key != "MLFLOW_AUTH_CONFIG_PATH":
                assert str(value).startswith("${"), (name, key)
        for item in [*(service.get("command") or []), *(service.get("entrypoint") or [])]:
            assert not re.search(r"://[^/@\s]+:[^/@\s]+@", str(item)), (name, item)


# ---- KubeRay against the code -------------------------------------------------------------


def _cpus(quantity: str) -> float:
    return float(quantity[:-1]) / 1000 if quantity.endswith("m") else float(quantity)


def test_kuberay_pods_offer_what_the_gang_admission_counts() -> None:
    spec = RAY_CLUSTER["spec"]
    assert spec["authOptions"]["mode"] == "token" and spec["enableInTreeAutoscaling"]
    head = spec["headGroupSpec"]["rayStartParams"]
    assert WORKER_RESOURCE not in head.get("resources", "")
    gpu_groups = 0
    for group in spec["workerGroupSpecs"]:
        params = group["rayStartParams"]
        (container,) = group["template"]["spec"]["containers"]
        requests, limits = container["resources"]["requests"], container["resources"]["limits"]
        cpus = float(params["num-cpus"])
        assert _cpus(requests["cpu"]) == _cpus(limits["cpu"]) == cpus, group["groupName"]
        assert json.loads(json.loads(params["resources"])) == {WORKER_RESOURCE: cpus}
        gpus = float(params.get("num-gpus", "0"))
        assert gpus == float(limits.get("nvidia.com/gpu", "0")), group["groupName"]
        gpu_groups += gpus > 0
        assert group["minReplicas"] <= group["replicas"] <= group["maxReplicas"]
    assert gpu_groups >= 1 and len(spec["workerGroupSpecs"]) > gpu_groups  # CPU and GPU


def test_the_rayjob_runs_a_selfsup_command_that_parses() -> None:
    command = shlex.split(RAY_JOB["spec"]["entrypoint"])
    assert command[0] == "selfsup"
    args = _parser().parse_args(command[1:])
    assert (args.encoder, args.data) == ("simclr-digits@champion", "builtin:digits")
