"""An end-to-end check, by hand (about two minutes; too long for the default test run): an
elastic SimCLR gang of 1 to 2 workers, admitted with 1 beside a one-CPU job on a 2-CPU
embedded stack, grows to 2 when that job ends, resuming from its checkpoint with its steps
going on. Prints its transitions and the number of workers each epoch ran with.

    .venv/bin/python -m benchmarks.check_elastic_growth
"""

from __future__ import annotations

import json
import os
import sqlite3
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from mlflow.tracking import MlflowClient

ROOT = Path(__file__).resolve().parent.parent
SELFSUP = str(Path(sys.executable).parent / "selfsup")


def main() -> int:
    home = Path(tempfile.mkdtemp(prefix="selfsup-grow-"))
    env = {**os.environ, "SELFSUP_HOME": str(home), "SELFSUP_ELASTIC_GROW_AFTER_S": "5"}
    env.pop("RAY_ADDRESS", None)

    def cli(*args: str) -> str:
        done = subprocess.run([SELFSUP, *args], env=env, capture_output=True, text=True)
        if done.returncode:
            raise SystemExit(f"selfsup {' '.join(args)}: {done.stderr[-2000:]}")
        return done.stdout

    def wait(job_id: str, states: tuple[str, ...]) -> dict:
        deadline = time.monotonic() + 600
        while (job := json.loads(cli("job", "status", job_id, "-o", "json")))[
            "state"
        ] not in states:
            assert time.monotonic() < deadline, job
            time.sleep(1)
        return job

    start = time.monotonic()
    cli("up", "--num-cpus", "2")
    try:
        blocker = home / "blocker.yaml"
        tiny = (ROOT / "tests" / "specs" / "tiny-pca.yaml").read_text()
        blocker.write_text(
            tiny.replace("name: tiny-pca", "name: blocker")
            .replace("epochs: 1", "epochs: 30")
            .replace("cpus_per_worker: 2", "cpus_per_worker: 1")
        )
        blocker_id = json.loads(cli("job", "submit", str(blocker), "-o", "json"))["id"]
        wait(blocker_id, ("RUNNING",))
        overrides = [
            "name=elastic",
            "resources.workers={min: 1, max: 2}",
            "train.epochs=60",
            "evaluate={linear: false, knn: false, label_fractions: [], finetune: false, "
            "baselines: false}",
            "register=null",
        ]
        spec = str(ROOT / "examples" / "simclr-digits.yaml")
        sets = [part for override in overrides for part in ("--set", override)]
        elastic_id = json.loads(cli("job", "submit", spec, "-o", "json", *sets))["id"]
        admitted = wait(elastic_id, ("RUNNING",))
        bounds = f"{admitted['min_workers']}-{admitted['max_workers']}"
        print(f"admitted with {admitted['workers']} workers of {bounds}")
        done = wait(elastic_id, ("SUCCEEDED", "FAILED", "CANCELLED"))
        print(f"{done['state']}: attempts {done['attempts']}, workers {done['workers']}")
        client = MlflowClient(f"sqlite:///{home / 'mlflow.db'}")
        run = done["mlflow_run_id"]
        sizes = [int(m.value) for m in client.get_metric_history(run, "train.workers")]
        print("workers per epoch:", sizes)
        resumes = client.get_metric_history(run, "train.resumed_from_epoch")
        print("resumed from epoch (at step):", [(int(m.value), m.step) for m in resumes])
        print("last step:", max(m.step for m in client.get_metric_history(run, "train.step")))
        query = (
            "select from_state, to_state, at, reason from transitions where job_id=? order by id"
        )
        for row in sqlite3.connect(home / "jobs.db").execute(query, (elastic_id,)):
            print("  ", *row)
    finally:
        cli("down")
        print(f"{time.monotonic() - start:.1f} s in all")
    return 0


if __name__ == "__main__":
    sys.exit(main())
