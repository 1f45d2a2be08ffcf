"""The job store's schema migrations (service/migrations), on SQLite and on a real PostgreSQL
server: a new store is made at the newest revision and matches the models; a store that
release 0.1.0 made (before versioning; dumps in tests/fixtures, made by that release's own
JobStore) is upgraded with every row kept and works on; upgrades racing each other agree."""

from __future__ import annotations

import sqlite3
import subprocess
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext
from sqlalchemy import create_engine, inspect, text

from service import migrations
from service.auth import authenticate
from service.controller import PAUSED_FLAG
from service.postgres import postgres_bin
from service.store import Base, JobState, JobStore
from tests.conftest import new_postgres_database
from tests.fixtures.make_store_0_1_0 import JOBS, TOKENS
from tests.test_store import new_job

FIXTURES = Path(__file__).parent / "fixtures"
TABLES = ("jobs", "transitions", "api_tokens", "controller_flags")


def schema_differences(url: str) -> list:
    """What Alembic's autogenerate would change to make the store match the models."""
    with create_engine(url).connect() as connection:
        return compare_metadata(MigrationContext.configure(connection), Base.metadata)


def revision(url: str) -> str | None:
    with create_engine(url).connect() as connection:
        return migrations.current(connection)


def columns(url: str) -> dict[str, list[str]]:
    engine = create_engine(url)
    found = {table: [c["name"] for c in inspect(engine).get_columns(table)] for table in TABLES}
    engine.dispose()
    return found


def rows(url: str, kept: dict[str, list[str]]) -> dict[str, list[tuple]]:
    """Every row of every table, in a stable order, as the database holds them: the values
    of the ``kept`` columns (those of the older schema; later ones are new and empty)."""
    with create_engine(url).connect() as connection:
        return {
            table: sorted(
                tuple(map(str, row))
                for row in connection.execute(text(f"SELECT {', '.join(kept[table])} FROM {table}"))
            )
            for table in TABLES
        }


def release_0_1_0_store(backend: str, tmp_path: Path, request: pytest.FixtureRequest) -> str:
    """A database holding what release 0.1.0's JobStore wrote (tests/fixtures); its URL."""
    dump = FIXTURES / f"store-0.1.0-{backend}.sql"
    if backend == "sqlite":
        path = tmp_path / "jobs.db"
        with sqlite3.connect(path) as connection:
            connection.executescript(dump.read_text())
        return f"sqlite:///{path}"
    url = new_postgres_database(request.getfixturevalue("postgres_url"))
    host_port, database = url.split("@", 1)[1].split("/")
    host, port = host_port.split(":")
    subprocess.run(  # psql restores a plain dump, as an operator would
        [str(postgres_bin() / "psql"), "-h", host, "-p", port, "-U", "selfsup", "-d", database]
        + ["-v", "ON_ERROR_STOP=1", "-q", "-f", str(dump)],
        check=True,
        capture_output=True,
    )
    return url


def test_a_new_store_is_made_at_the_newest_revision_and_matches_the_models(
    store_url: str,
) -> None:
    JobStore(store_url)
    assert revision(store_url) == migrations.head()
    assert schema_differences(store_url) == []


@pytest.mark.parametrize("backend", ["sqlite", "postgresql"])
def test_a_release_0_1_0_store_is_upgraded_with_every_row_kept(
    backend: str, tmp_path: Path, request: pytest.FixtureRequest
) -> None:
    url = release_0_1_0_store(backend, tmp_path, request)
    old_columns = columns(url)
    before = rows(url, old_columns)
    assert revision(url) is None and len(before["jobs"]) == len(JOBS)

    store = JobStore(url)
    assert revision(url) == migrations.head()
    assert schema_differences(url) == []  # revision 0001 was release 0.1.0's schema exactly
    assert rows(url, old_columns) == before
    # The upgraded store serves as before: every job in its state, with its log, the tokens
    # and the paused queue.
    for job_id, (owner, states, message) in JOBS.items():
        job = store.get(job_id)
        assert (job.owner, job.state, job.message) == (owner, (states or ["QUEUED"])[-1], message)
        assert [t.to_state for t in store.transitions(job_id)] == ["QUEUED", *states]
        assert job.depends_on is None  # 0003's column: an older job waits for no other
        assert job.worker_cpus is None  # 0004's: admission counts all of an older job's CPUs
    for token, (user, role) in TOKENS.items():
        principal = authenticate(store, f"Bearer {token}")
        assert (principal.user, principal.role) == (user, role)
    assert store.flag(PAUSED_FLAG) == "true"
    store.add(new_job("job-after-upgrade"), actor="alice", reason="submitted")
    assert store.transition(
        "job-0a0000000004", [JobState.QUEUED], JobState.CANCELLED, "root", "after the upgrade"
    )
    assert store.count() == len(JOBS) + 1
    JobStore(url)  # at the newest revision already: nothing to do
    assert revision(url) == migrations.head() and store.count() == len(JOBS) + 1


def test_stores_opened_at_once_upgrade_once(store_url: str) -> None:
    """Controllers starting together on one new database: one makes the tables, the others
    find them made."""
    with ThreadPoolExecutor(max_workers=4) as pool:
        stores = list(pool.map(lambda _: JobStore(store_url), range(4)))
    stores[0].add(new_job("job-1"), actor="alice", reason="submitted")
    assert [store.count() for store in stores] == [1, 1, 1, 1]
    assert revision(store_url) == migrations.head()
