"""`make demo`: start the embedded stack, pretrain SimCLR on digits with two DDP workers,
and print what came out and where to look.

Run as ``python -m selfsup.demo``; everything lands in ./.selfsup (or $SELFSUP_HOME), where
the `selfsup` CLI finds it afterwards with no flags.
"""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

from selfsup import cli
from service.client import ApiClient
from service.config import StatePaths

SPEC = Path(__file__).resolve().parent.parent / "examples" / "simclr-digits.yaml"


def main() -> int:
    started = time.monotonic()
    paths = StatePaths.discover()
    bin_dir = Path(sys.executable).parent
    selfsup_cmd = os.path.relpath(bin_dir / "selfsup")
    # The demo job runs two workers of one CPU each.
    workers_cpus = str(max(2, os.cpu_count() or 2))
    print(f"== starting the embedded stack in {paths.root}", flush=True)
    if cli.main(["up", "--num-cpus", workers_cpus]) != 0:
        return 1
    print(f"\n== submitting {os.path.relpath(SPEC)}", flush=True)
    api = ApiClient.discover(paths)
    before = {job["id"] for job in api.request("GET", "/v1/jobs")}
    code = cli.main(["job", "submit", str(SPEC), "--wait"])
    new_jobs = [job for job in api.request("GET", "/v1/jobs") if job["id"] not in before]
    if not new_jobs:
        return code or 1
    job = new_jobs[0]
    result = job["result"]

    print("\n== demo summary")
    print(f"job:        {job['id']}  {job['state']}  ({time.monotonic() - started:.0f} s in all)")
    if job["state"] != "SUCCEEDED":
        print(f"reason:     {job['message']}")
        print(f"logs:       {selfsup_cmd} job logs {job['id']}")
        return 1
    print("linear probe top-1 on the held-out split (same split, same probe):")
    for label, key in (
        ("SimCLR encoder (this job)", "eval.linear.top1"),
        ("randomly initialised encoder", "baseline.random.linear.top1"),
        ("raw pixels", "baseline.raw.linear.top1"),
    ):
        print(f"  {label:30} {result.get(key, float('nan')):.4f}")
    model = f"{result.get('model_name')}@{result.get('model_alias')}"
    print(f"registered: {model} (version {result.get('model_version')})")
    python = os.path.relpath(bin_dir / "python")
    print(f"  load it:  {python} -c \"import selfsup; selfsup.load_encoder('models:/{model}')\"")
    mlflow_cmd = os.path.relpath(bin_dir / "mlflow")
    print(f"MLflow UI:  {selfsup_cmd} ui    (then open http://127.0.0.1:5000)")
    print(f"  or:       {mlflow_cmd} ui --backend-store-uri {paths.tracking_uri}")
    print(f"more:       {selfsup_cmd} job list | {selfsup_cmd} encoder list | {selfsup_cmd} down")
    return 0


if __name__ == "__main__":
    sys.exit(main())
