"""The persistent job store: jobs and an append-only log of their state transitions.

SQLAlchemy, so the same code runs on the embedded SQLite file and on PostgreSQL. Every state
change is a compare-and-set (UPDATE ... WHERE state IN (...)), so two controllers or two CLI
processes racing on one job cannot both move it.
"""

from __future__ import annotations

import enum
from collections.abc import Iterable
from datetime import UTC, datetime
from typing import Any

from sqlalchemy import (
    JSON,
    DateTime,
    Float,
    ForeignKey,
    Integer,
    String,
    Text,
    create_engine,
    event,
    select,
    update,
)
from sqlalchemy.engine import Engine
from sqlalchemy.orm import DeclarativeBase, Mapped, Session, mapped_column


class JobState(enum.StrEnum):
    QUEUED = "QUEUED"
    RUNNING = "RUNNING"
    SUCCEEDED = "SUCCEEDED"
    FAILED = "FAILED"
    CANCELLED = "CANCELLED"

    @property
    def is_final(self) -> bool:
        return self in FINAL_STATES


FINAL_STATES = frozenset({JobState.SUCCEEDED, JobState.FAILED, JobState.CANCELLED})
ACTIVE_STATES = frozenset({JobState.RUNNING})


def utcnow() -> datetime:
    return datetime.now(UTC)


class Base(DeclarativeBase):
    pass


class Job(Base):
    __tablename__ = "jobs"

    id: Mapped[str] = mapped_column(String(64), primary_key=True)
    name: Mapped[str] = mapped_column(String(128))
    owner: Mapped[str] = mapped_column(String(128), default="local")
    state: Mapped[str] = mapped_column(String(16), index=True)
    priority: Mapped[int] = mapped_column(Integer, default=0)
    spec_yaml: Mapped[str] = mapped_column(Text)
    spec: Mapped[dict[str, Any]] = mapped_column(JSON)
    config_hash: Mapped[str] = mapped_column(String(32))
    cpus: Mapped[float] = mapped_column(Float)
    gpus: Mapped[float] = mapped_column(Float)
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    mlflow_run_id: Mapped[str | None] = mapped_column(String(64), nullable=True)
    message: Mapped[str | None] = mapped_column(Text, nullable=True)
    result: Mapped[dict[str, Any] | None] = mapped_column(JSON, nullable=True)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))
    updated_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))
    started_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True), nullable=True)
    finished_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True), nullable=True)


class Transition(Base):
    """Append-only: who moved which job from what to what, when and why."""

    __tablename__ = "transitions"

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    job_id: Mapped[str] = mapped_column(ForeignKey("jobs.id"), index=True)
    from_state: Mapped[str | None] = mapped_column(String(16), nullable=True)
    to_state: Mapped[str] = mapped_column(String(16))
    actor: Mapped[str] = mapped_column(String(128))
    reason: Mapped[str] = mapped_column(Text, default="")
    at: Mapped[datetime] = mapped_column(DateTime(timezone=True))


def _sqlite_pragmas(engine: Engine) -> None:
    @event.listens_for(engine, "connect")
    def _on_connect(connection: Any, _record: Any) -> None:
        cursor = connection.cursor()
        # WAL lets the CLI read while a driver or another CLI writes; the busy timeout makes
        # a writer wait for the lock instead of failing.
        cursor.execute("PRAGMA journal_mode=WAL")
        cursor.execute("PRAGMA busy_timeout=30000")
        cursor.close()


class JobStore:
    def __init__(self, url: str) -> None:
        self.engine = create_engine(url)
        if self.engine.dialect.name == "sqlite":
            _sqlite_pragmas(self.engine)
        Base.metadata.create_all(self.engine)

    def add(self, job: Job, actor: str, reason: str) -> Job:
        with Session(self.engine, expire_on_commit=False) as session, session.begin():
            session.add(job)
            session.flush()
            session.add(
                Transition(
                    job_id=job.id,
                    from_state=None,
                    to_state=job.state,
                    actor=actor,
                    reason=reason,
                    at=job.created_at,
                )
            )
        return job

    def get(self, job_id: str) -> Job | None:
        with Session(self.engine, expire_on_commit=False) as session:
            return session.get(Job, job_id)

    def list(self, states: Iterable[JobState] | None = None) -> list[Job]:
        query = select(Job).order_by(Job.created_at.desc())
        if states is not None:
            query = query.where(Job.state.in_([str(state) for state in states]))
        with Session(self.engine, expire_on_commit=False) as session:
            return list(session.scalars(query))

    def transition(
        self,
        job_id: str,
        from_states: Iterable[JobState],
        to_state: JobState,
        actor: str,
        reason: str = "",
        **fields: Any,
    ) -> bool:
        """Move a job to ``to_state`` only if it is in one of ``from_states``; True if moved."""
        now = utcnow()
        allowed = [str(state) for state in from_states]
        with Session(self.engine) as session, session.begin():
            current = session.scalar(select(Job.state).where(Job.id == job_id))
            if current is None or current not in allowed:
                return False
            moved = session.execute(
                update(Job)
                .where(Job.id == job_id, Job.state == current)
                .values(state=str(to_state), updated_at=now, **fields)
            ).rowcount
            if not moved:
                return False
            session.add(
                Transition(
                    job_id=job_id,
                    from_state=current,
                    to_state=str(to_state),
                    actor=actor,
                    reason=reason,
                    at=now,
                )
            )
        return True

    def update(self, job_id: str, **fields: Any) -> None:
        with Session(self.engine) as session, session.begin():
            session.execute(
                update(Job).where(Job.id == job_id).values(updated_at=utcnow(), **fields)
            )

    def transitions(self, job_id: str) -> list[Transition]:
        query = select(Transition).where(Transition.job_id == job_id).order_by(Transition.id)
        with Session(self.engine, expire_on_commit=False) as session:
            return list(session.scalars(query))
