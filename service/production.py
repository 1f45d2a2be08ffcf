"""`selfsup up --production`: the deployed shape of the stack, on one machine, for a team to
try before it deploys (infra/compose runs the same processes in containers):

- PostgreSQL (a private cluster of Debian's binaries): the job store, MLflow's tracking
  store and MLflow's user store, one database each;
- an S3 endpoint (moto's server; its objects live in memory) holding MLflow's artifacts and
  Ray Train's checkpoints;
- `mlflow server` with the basic-auth app and ``--artifacts-destination s3://...``: clients
  need a user name and password and no S3 credentials;
- a Ray cluster of a head (drivers and data tasks only) and several worker nodes, each
  offering the custom resource ``WORKER_RESOURCE`` that every Ray Train worker asks for, so
  training always spreads over worker nodes and a lost node is a lost part of the gang;
- the controller on PostgreSQL, configured by <state folder>/server.yaml as a deployment is.

The S3 key, the MLflow admin's password and the Flask secret are made once and kept in
<state folder>/production-secrets.json (mode 0600); processes get them in their
environment when they start, never on a command line or in a job's payload.
"""

from __future__ import annotations

import dataclasses
import getpass
import json
import os
import secrets
import shutil
import subprocess
import sys
from pathlib import Path

from service.config import StackInfo, StatePaths
from service.ports import free_port
from service.postgres import PrivateCluster, create_database, postgres_bin
from service.settings import ServerSettings, load_settings
from service.stack import (
    StackError,
    head_env,
    running_stack,
    spawn_detached,
    start_controller,
    start_detached,
    start_ray_head,
    stop_groups,
    wait_ready,
    write_secret,
)
from service.tracking import Accounts, TrackingError

BUCKET = "selfsup"
WORKER_RESOURCE = "selfsup_worker"
MLFLOW_ADMIN = "admin"
# One database per store on the stack's PostgreSQL.
DATABASES = {"store": "selfsup", "tracking": "mlflow", "mlflow_users": "mlflow_auth"}


@dataclasses.dataclass(frozen=True)
class Secrets:
    s3_access_key: str
    s3_secret_key: str
    mlflow_admin_password: str
    flask_secret: str

    @classmethod
    def ensure(cls, paths: StatePaths) -> Secrets:
        """The stack's secrets, made on its first start."""
        if not paths.production_secrets.is_file():
            made = cls("selfsup", *(secrets.token_urlsafe(32) for _ in range(3)))
            write_secret(paths.production_secrets, json.dumps(dataclasses.asdict(made)))
        return cls(**json.loads(paths.production_secrets.read_text()))

    def s3_env(self, endpoint: str) -> dict[str, str]:
        """boto3's, pyarrow's and MLflow's standard variables for the stack's S3."""
        return {
            "AWS_ENDPOINT_URL": endpoint,
            "MLFLOW_S3_ENDPOINT_URL": endpoint,
            "AWS_ACCESS_KEY_ID": self.s3_access_key,
            "AWS_SECRET_ACCESS_KEY": self.s3_secret_key,
            "AWS_DEFAULT_REGION": "us-east-1",
        }

    @property
    def mlflow_admin_env(self) -> dict[str, str]:
        """MLflow's client credentials of the admin, which the controller and the jobs use."""
        return {
            "MLFLOW_TRACKING_USERNAME": MLFLOW_ADMIN,
            "MLFLOW_TRACKING_PASSWORD": self.mlflow_admin_password,
        }


# MLflow's server otherwise starts a job runner and seven Huey consumer processes for its
# GenAI features (scorers, trace roll-ups), which selfsup never uses: ~25 CPU-seconds at
# every start on two cores. infra/compose sets the same.
MLFLOW_SERVER_ENV = {"MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}


def mlflow_server_args(backend_store_uri: str, artifacts_destination: str) -> list[str]:
    """`mlflow server`'s arguments, host and port aside (infra/compose gives the same)."""
    return [
        "--app-name=basic-auth",
        f"--backend-store-uri={backend_store_uri}",
        f"--artifacts-destination={artifacts_destination}",
    ]


def mlflow_auth_config(users_database: str) -> str:
    """The basic-auth app's settings: every signed-in user reads every run and model; a
    registered model is written by the users granted it (its creator, the job's owner) and
    admins. No anonymous access at all. The admin's password comes from the environment."""
    return (
        "[mlflow]\n"
        "default_permission = READ\n"
        f"database_uri = {users_database}\n"
        f"admin_username = {MLFLOW_ADMIN}\n"
        "authorization_function = mlflow.server.auth:authenticate_request_basic_auth\n"
    )


def _start_s3(paths: StatePaths, keys: Secrets, started: list[int]) -> str:
    import boto3

    moto = shutil.which("moto_server", path=str(Path(sys.executable).parent))
    if moto is None:
        raise StackError(
            "moto_server is not installed beside this Python: pip install 'selfsup[tryout]'"
        )
    port = free_port()
    endpoint = f"http://127.0.0.1:{port}"
    command = [moto, "-H", "127.0.0.1", "-p", str(port)]
    started.append(start_detached(command, paths, "s3", f"{endpoint}/", head_env(paths)).pid)
    env = keys.s3_env(endpoint)
    client = boto3.client(
        "s3",
        endpoint_url=endpoint,
        aws_access_key_id=env["AWS_ACCESS_KEY_ID"],
        aws_secret_access_key=env["AWS_SECRET_ACCESS_KEY"],
        region_name=env["AWS_DEFAULT_REGION"],
    )
    client.create_bucket(Bucket=BUCKET)
    return endpoint


def _spawn_mlflow(
    paths: StatePaths, keys: Secrets, urls: dict[str, str], s3: str
) -> tuple[subprocess.Popen, str]:
    """The MLflow server, starting (``wait_ready`` on its /health); its URL."""
    config = paths.root / "mlflow-auth.ini"
    config.write_text(mlflow_auth_config(urls["mlflow_users"]))
    port = free_port()
    tracking_uri = f"http://127.0.0.1:{port}"
    command = [
        str(Path(sys.executable).with_name("mlflow")),
        "server",
        "--host=127.0.0.1",
        f"--port={port}",
        "--workers=1",
        *mlflow_server_args(urls["tracking"], f"s3://{BUCKET}/mlflow"),
    ]
    env = {
        **head_env(paths),
        **keys.s3_env(s3),
        **MLFLOW_SERVER_ENV,
        "MLFLOW_AUTH_CONFIG_PATH": str(config),
        "MLFLOW_AUTH_ADMIN_PASSWORD": keys.mlflow_admin_password,
        "MLFLOW_FLASK_SERVER_SECRET_KEY": keys.flask_secret,
    }
    return spawn_detached(command, paths, "mlflow", env), tracking_uri


def _start_worker_nodes(
    paths: StatePaths,
    head: StackInfo,
    count: int,
    cpus: float,
    node_env: dict[str, str],
    started: list[int],
) -> None:
    """``count`` more Ray nodes on this machine joining the head, one after the other: raylets
    registering all at once with a GCS on 2 busy cores time out."""
    env = {**head_env(paths, head.dashboard_url), **node_env}
    for index in range(count):
        process, ready_url = _spawn_worker_node(paths, head, index, cpus, env)
        started.append(process.pid)
        wait_ready(process, paths, f"ray-worker-{index}", ready_url)


def _spawn_worker_node(
    paths: StatePaths, head: StackInfo, index: int, cpus: float, env: dict[str, str]
) -> tuple[subprocess.Popen, str]:
    """One more Ray node joining the head, every port its own; the URL that answers once it
    has joined."""
    names = (
        "node-manager-port",
        "object-manager-port",
        "dashboard-agent-listen-port",
        "dashboard-agent-grpc-port",
        "metrics-export-port",
        "runtime-env-agent-port",
    )
    port = {name: free_port() for name in names}
    command = [
        str(Path(sys.executable).with_name("ray")),
        "start",
        "--block",
        "--disable-usage-stats",
        f"--address={head.ray_address}",
        f"--num-cpus={cpus:g}",
        "--num-gpus=0",
        f"--resources={json.dumps({WORKER_RESOURCE: cpus})}",
        *(f"--{name}={number}" for name, number in port.items()),
    ]
    # The node has joined once its dashboard agent answers (HTTP, on its own port).
    agent = f"http://127.0.0.1:{port['dashboard-agent-listen-port']}/"
    return spawn_detached(command, paths, f"ray-worker-{index}", env), agent


def up_production(paths: StatePaths, worker_nodes: int = 3, cpus_per_node: float = 1) -> StackInfo:
    """Start what is not running of the production stack for ``paths``."""
    stack = running_stack(paths)
    if stack is not None and stack.postgres_port is None:
        raise StackError(f"the stack in {paths.root} is an embedded one: `selfsup down` first")
    for folder in (paths.root, paths.logs):
        folder.mkdir(parents=True, exist_ok=True)
    keys = Secrets.ensure(paths)
    if stack is None:
        stack = _start_base(paths, keys, worker_nodes, cpus_per_node)
    # The settings file alone, as a deployment's controller reads it (no SELFSUP_* over it).
    settings = load_settings(paths.server_config, env={})
    # S3 too: the controller lists a job's S3 data source at submit time.
    env = {**head_env(paths), **keys.s3_env(stack.endpoints["s3"]), **keys.mlflow_admin_env}
    stack = start_controller(paths, stack, settings, env)
    # The local user's MLflow account: an admin's, whose password is their controller token.
    use_admin_credentials(paths)
    token = paths.api_token_file.read_text().strip()
    try:
        Accounts(settings.tracking_uri).set_password(getpass.getuser(), token, admin=True)
    except TrackingError as error:
        raise StackError(f"{error} (see {paths.logs / 'mlflow.log'})") from None
    return stack


def use_admin_credentials(paths: StatePaths) -> None:
    """Act as MLflow's admin in this process (unless its environment names an MLflow user),
    if ``paths`` holds a production stack's secrets: for `selfsup token create` and `up`."""
    if paths.production_secrets.is_file():
        for name, value in Secrets.ensure(paths).mlflow_admin_env.items():
            os.environ.setdefault(name, value)


def controller_settings(
    store_url: str, tracking_uri: str, dashboard_url: str, paths: StatePaths
) -> ServerSettings:
    """The controller's settings in the production shape (infra/compose sets the same)."""
    return ServerSettings(
        port=free_port(),
        store_url=store_url,
        tracking_uri=tracking_uri,
        mlflow_ui_url=tracking_uri,
        ray_dashboard_url=dashboard_url,
        ray_token_file=str(paths.ray_token_file),
        storage_path=f"s3://{BUCKET}/checkpoints",
        driver_python=sys.executable,
        worker_resource=WORKER_RESOURCE,
    )


def _start_base(
    paths: StatePaths, keys: Secrets, worker_nodes: int, cpus_per_node: float
) -> StackInfo:
    """Everything but the controller, from scratch, and the controller's settings file; on a
    failure, what did start is stopped again."""
    if postgres_bin() is None:
        raise StackError("PostgreSQL is not installed (Debian package: postgresql)")
    postgres = PrivateCluster(paths.postgres_root, free_port())
    started: list[int] = []
    try:
        postgres.start()
        urls = {role: create_database(postgres.url, db, True) for role, db in DATABASES.items()}
        s3 = _start_s3(paths, keys, started)
        mlflow, tracking_uri = _spawn_mlflow(paths, keys, urls, s3)
        started.append(mlflow.pid)
        # The head runs the drivers (zero CPUs each) and Ray Data's decode tasks; Train
        # workers ask for WORKER_RESOURCE, which only worker nodes offer. Ray starts while
        # MLflow does.
        node_env = {**keys.s3_env(s3), **keys.mlflow_admin_env}
        head = start_ray_head(paths, num_cpus=1, num_gpus=0, extra_env=node_env)
        started.append(head.head_pid)
        _start_worker_nodes(paths, head, worker_nodes, cpus_per_node, node_env, started)
        wait_ready(mlflow, paths, "mlflow", f"{tracking_uri}/health")
    except BaseException:
        stop_groups(started)
        postgres.stop()
        paths.stack_file.unlink(missing_ok=True)
        raise
    names = ["s3", "mlflow"] + [f"ray-worker-{index}" for index in range(worker_nodes)]
    stack = dataclasses.replace(
        head,
        num_cpus=head.num_cpus + worker_nodes * cpus_per_node,
        services=dict(zip(names, started[:2] + started[3:], strict=True)),
        endpoints={"s3": s3, "mlflow": tracking_uri},
        postgres_port=postgres.port,
    )
    stack.save(paths.stack_file)
    controller_settings(urls["store"], tracking_uri, head.dashboard_url, paths).save(
        paths.server_config
    )
    return stack


if __name__ == "__main__":
    # `python -m service.production mlflow-auth-config DATABASE_URL`: the basic-auth app's
    # settings file on stdout, for a deployment's MLflow container (infra/compose).
    if len(sys.argv) != 3 or sys.argv[1] != "mlflow-auth-config":
        sys.exit("usage: python -m service.production mlflow-auth-config DATABASE_URL")
    print(mlflow_auth_config(sys.argv[2]), end="")
