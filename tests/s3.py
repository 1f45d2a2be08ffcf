"""A private S3 endpoint for tests: moto's server on a free loopback port, with IAM checks on
so that missing and wrong credentials are refused as a real endpoint would refuse them."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from service.ports import free_port

# moto lets this many requests through before it checks signatures: the three that make the
# test user, its policy and its key.
_SETUP_REQUESTS = 3


@dataclass(frozen=True)
class S3Endpoint:
    url: str
    access_key: str
    secret_key: str

    @property
    def env(self) -> dict[str, str]:
        """What a process needs to reach the endpoint: boto3's standard variables."""
        return {
            "AWS_ENDPOINT_URL": self.url,
            "AWS_ACCESS_KEY_ID": self.access_key,
            "AWS_SECRET_ACCESS_KEY": self.secret_key,
            "AWS_DEFAULT_REGION": "us-east-1",
        }

    def client(self):  # noqa: ANN201 - boto3's client class is generated at run time
        import boto3

        return boto3.client(
            "s3",
            endpoint_url=self.url,
            aws_access_key_id=self.access_key,
            aws_secret_access_key=self.secret_key,
            region_name="us-east-1",
        )


def _wait_until_listening(port: int, server: subprocess.Popen, timeout: float = 30) -> None:
    # A bare connection, not a request: every request counts against _SETUP_REQUESTS.
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if server.poll() is not None:
            raise RuntimeError(f"moto_server exited with {server.returncode}")
        try:
            socket.create_connection(("127.0.0.1", port), timeout=2).close()
            return
        except OSError:
            time.sleep(0.2)
    raise TimeoutError(f"moto_server did not listen on port {port} within {timeout} s")


@contextmanager
def s3_server() -> Iterator[S3Endpoint]:
    """Start moto's S3 server with IAM on; yield it with the key of a user allowed all."""
    import boto3

    moto = shutil.which("moto_server", path=str(Path(sys.executable).parent))
    if moto is None:
        raise FileNotFoundError("moto_server is not installed beside this Python")
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    server = subprocess.Popen(
        [moto, "-H", "127.0.0.1", "-p", str(port)],
        env={**os.environ, "INITIAL_NO_AUTH_ACTION_COUNT": str(_SETUP_REQUESTS)},
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        _wait_until_listening(port, server)
        iam = boto3.client(
            "iam",
            endpoint_url=url,
            aws_access_key_id="setup",
            aws_secret_access_key="setup",
            region_name="us-east-1",
        )
        iam.create_user(UserName="selfsup-tests")
        allow_all = {"Effect": "Allow", "Action": "*", "Resource": "*"}
        iam.put_user_policy(
            UserName="selfsup-tests",
            PolicyName="all",
            PolicyDocument=json.dumps({"Version": "2012-10-17", "Statement": [allow_all]}),
        )
        key = iam.create_access_key(UserName="selfsup-tests")["AccessKey"]
        yield S3Endpoint(url, key["AccessKeyId"], key["SecretAccessKey"])
    finally:
        server.terminate()
        server.wait(timeout=30)
