"""The CLI's conveniences: `--set` overrides (a parser, checked with hypothesis), `selfsup spec
validate` (the submit-time checks on the real controller, nothing stored), `selfsup init`
(a commented spec for every method, valid as written), `job list` filters, and bash
completion made from the parser. The queue is paused while jobs are submitted here, so no
training runs."""

from __future__ import annotations

import json
import string
import subprocess
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
import yaml
from hypothesis import given
from hypothesis import strategies as st

from pipelines.params import METHOD_PARAMS
from pipelines.spec import SpecError, apply_overrides, load_spec_text, parse_spec, read_yaml
from pipelines.spec_template import spec_template
from selfsup.cli import CliError, since_time
from tests.conftest import Stack

TINY = Path(__file__).parent / "specs" / "tiny-pca.yaml"
KEYS = st.text(string.ascii_lowercase + "_", min_size=1, max_size=8)
SCALARS = st.one_of(
    st.integers(-(10**6), 10**6),
    st.floats(allow_nan=False, allow_infinity=False, width=32),
    st.booleans(),
    st.text(string.ascii_letters + string.digits + "-_/:", min_size=1, max_size=12),
)


# ---- --set --------------------------------------------------------------------------------


@given(path=st.lists(KEYS, min_size=1, max_size=4), value=SCALARS)
def test_an_override_sets_the_value_at_its_path(path: list[str], value: object) -> None:
    text = yaml.safe_dump({"name": "x", "train": {"epochs": 3}})
    changed = read_yaml(apply_overrides(text, [f"{'.'.join(path)}={json.dumps(value)}"]))
    found = changed
    for key in path:
        if not isinstance(found, dict):  # the path ran into a value set before it: refused
            return
        found = found[key]
    assert found == value


@given(assignment=st.text(max_size=30))
def test_any_malformed_override_is_a_spec_error(assignment: str) -> None:
    """Whatever is typed after --set, the answer is a result or a SpecError, never a crash."""
    try:
        apply_overrides("name: x\ntrain: {epochs: 3}\n", [assignment])
    except SpecError as error:
        assert error.problems[0][0] == "--set"


def test_overrides_reach_the_parsed_spec_and_keep_the_rest() -> None:
    text = TINY.read_text()
    spec = load_spec_text(
        apply_overrides(text, ["train.lr=1e-3", "resources.workers=1", "priority=5"])
    )
    original = load_spec_text(text)
    assert (spec.train.lr, spec.resources.workers, spec.priority) == (1e-3, 1, 5)
    assert spec.method == original.method and spec.data == original.data
    assert apply_overrides(text, []) == text  # nothing to set: the file's own text, comments
    with pytest.raises(SpecError, match="name is a value, not a section"):
        apply_overrides(text, ["name.first=x"])


@pytest.mark.parametrize(
    ("text", "back"),
    [("90s", timedelta(seconds=90)), ("30m", timedelta(minutes=30)), ("2d", timedelta(days=2))],
)
def test_since_takes_durations(text: str, back: timedelta) -> None:
    now = datetime(2026, 12, 4, 12, tzinfo=UTC)
    assert since_time(text, now) == now - back


def test_since_takes_iso_dates_and_refuses_the_rest() -> None:
    now = datetime.now(UTC)
    assert since_time("2026-12-01", now) == datetime(2026, 12, 1, tzinfo=UTC)
    with pytest.raises(CliError, match="give a duration"):
        since_time("last tuesday", now)


# ---- selfsup init ---------------------------------------------------------------------------


@pytest.mark.parametrize("method", sorted(METHOD_PARAMS))
def test_init_writes_a_valid_spec_with_every_default(method: str) -> None:
    text = spec_template(method)
    spec = load_spec_text(text)
    assert spec.method.name == method and spec.registration is not None
    # Every field of the method's section is written out, at its default.
    assert spec.method == parse_spec({"name": "x", **_minimal(method)}).method
    written = read_yaml(text)["method"]
    assert set(written) == set(type(spec.method).model_fields)
    assert all("#" in line for line in text.splitlines() if line.startswith("  "))


def _minimal(method: str) -> dict:
    archs = METHOD_PARAMS[method].encoder_archs
    return {
        "method": {"name": method},
        "data": {"source": "builtin:digits"},
        **({"encoder": {"arch": archs[0]}} if archs else {}),
    }


def test_init_refuses_an_unknown_method_and_an_existing_file(stack: Stack, tmp_path: Path):
    unknown = stack.cli("init", "simclrr")
    assert unknown.returncode == 2 and "unknown method 'simclrr': one of" in unknown.stderr
    target = tmp_path / "spec.yaml"
    stack.cli("init", "simclr", "-o", str(target), check=True)
    before = target.read_text()
    again = stack.cli("init", "moco", "-o", str(target))
    assert again.returncode == 2 and "exists" in again.stderr
    assert target.read_text() == before  # the user's file is untouched


# ---- on the live controller -----------------------------------------------------------------


def test_spec_validate_runs_the_submit_checks_and_stores_nothing(stack: Stack, tmp_path: Path):
    before = json.loads(stack.cli("job", "list", "--all", "-o", "json", check=True).stdout)
    checked = stack.cli(
        "spec",
        "validate",
        str(TINY),
        "--set",
        "resources.workers=2",
        "--set",
        "resources.cpus_per_worker=1",
    )
    assert checked.returncode == 0, checked.stderr
    assert (
        "valid (tiny-pca: 2 workers" in checked.stdout and "nothing was submitted" in checked.stdout
    )
    as_json = json.loads(stack.cli("spec", "validate", str(TINY), "-o", "json", check=True).stdout)
    assert as_json["workers"] == 1 and as_json["spec"]["method"]["name"] == "pca"

    too_big = stack.cli("spec", "validate", str(TINY), "--set", "resources.cpus_per_worker=64")
    assert too_big.returncode == 2 and "resources: the job needs 64 CPUs" in too_big.stderr
    missing = tmp_path / "missing-data.yaml"
    missing.write_text(TINY.read_text().replace("builtin:digits", f"file://{tmp_path}/none"))
    unreadable = stack.cli("spec", "validate", str(missing))
    assert unreadable.returncode == 2 and "data.source" in unreadable.stderr
    bad_set = stack.cli("spec", "validate", str(TINY), "--set", "train.lr")
    assert bad_set.returncode == 2 and "is not FIELD.PATH=VALUE" in bad_set.stderr
    after = json.loads(stack.cli("job", "list", "--all", "-o", "json", check=True).stdout)
    assert len(after) == len(before)


def test_submit_with_overrides_and_list_filters(stack: Stack) -> None:
    with stack.paused():
        submitted = stack.cli(
            "job",
            "submit",
            str(TINY),
            "--set",
            "name=filter-me",
            "--set",
            "train.epochs=2",
            "-o",
            "json",
            check=True,
        )
        job = json.loads(submitted.stdout)
        status = json.loads(stack.cli("job", "status", job["id"], "-o", "json", check=True).stdout)
        assert (status["name"], status["epochs"]) == ("filter-me", 2)

        def listed(*filters: str) -> list[str]:
            out = stack.cli("job", "list", "--all", *filters, "-o", "json", check=True).stdout
            return [item["id"] for item in json.loads(out)]

        assert listed("--name", "filter-me") == [job["id"]]
        assert job["id"] in listed("--state", "queued", "--since", "10m")
        assert job["id"] not in listed("--state", "SUCCEEDED")
        future = (datetime.now(UTC) + timedelta(hours=1)).isoformat()
        assert listed("--since", future) == []
        stack.cli("job", "cancel", job["id"], check=True)
    bad = stack.cli("job", "list", "--state", "SLEEPING")
    assert bad.returncode == 2 and "state" in bad.stderr and "'QUEUED'" in bad.stderr


def test_bash_completion_completes_commands_and_options(stack: Stack) -> None:
    script = stack.cli("completion", "bash", check=True).stdout
    probe = (
        script
        + "COMP_WORDS=(selfsup job submit spec.yaml --s); COMP_CWORD=4; _selfsup_complete; "
        + 'echo "${COMPREPLY[*]}"; COMP_WORDS=(selfsup sp); COMP_CWORD=1; _selfsup_complete; '
        + 'echo "${COMPREPLY[*]}"'
    )
    result = subprocess.run(["bash", "-c", probe], capture_output=True, text=True, check=True)
    assert result.stdout.split("\n")[:2] == ["--set", "spec"]
