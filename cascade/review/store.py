"""The review store: tasks, claims with leases, decisions (an outbox for the topics), accounts, stats.

SQLite under `CASCADE_DATA_DIR` by default, PostgreSQL (or any SQLAlchemy URL) with
`CASCADE_REVIEW_DB_URL`. The schema is made by Alembic migrations shipped in the package.
Every write that must be exclusive (a claim, a decision) is one conditional UPDATE, so two
reviewers or two processes can race on it and exactly one wins, on either database.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import secrets
import uuid
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from alembic import command
from alembic.config import Config
from sqlalchemy import ColumnElement, Engine, case, create_engine, delete, event, func, select, update
from sqlalchemy.exc import DataError, IntegrityError
from sqlalchemy.orm import Session, sessionmaker

from cascade.contract import (
    HUMAN,
    Appeal,
    AppealRuling,
    Decision,
    ReviewDecision,
    StageAction,
    TraceEntry,
    Verdict,
)
from cascade.data import FLAGGED
from cascade.review.models import (
    Account,
    BankAudit,
    BlockedVerdict,
    DecisionRow,
    StageJudgement,
    Task,
    TaskKind,
    TaskStatus,
)
from cascade.settings import Settings

APPEAL_PRIORITY_BOOST = 1.0  # violation scores are in [0, 1]: appeals sort above every review task
LEANS_VIOLATING = 0.5  # a stage whose highest score reaches this leaned to "violating" (for live precision)
HUMAN_STAGE_VERSION = "review-1"
MAX_ID_CHARS = 512  # as ContentItem.id


class ReviewError(ValueError):
    """A request the store refuses (unknown task, lost claim, bad input); the message says why."""


def utc_now() -> datetime:
    return datetime.now(UTC)


def _aware(value: datetime | None) -> datetime | None:
    # SQLite hands back naive datetimes for timezone-aware columns; they were stored as UTC.
    return value.replace(tzinfo=UTC) if value is not None and value.tzinfo is None else value


def database_url(settings: Settings) -> str:
    if settings.review_db_url is not None:
        return settings.review_db_url.get_secret_value()
    directory = settings.data_path("review")
    directory.mkdir(exist_ok=True)
    return f"sqlite:///{directory / 'review.db'}"


def migrate(engine: Engine) -> None:
    """Bring the schema to the newest revision (idempotent)."""
    config = Config()
    config.set_main_option("script_location", str(Path(__file__).parent / "migrations"))
    with engine.begin() as connection:
        config.attributes["connection"] = connection
        command.upgrade(config, "head")


def hash_password(password: str, salt: bytes | None = None) -> str:
    """scrypt (stdlib), salted: `scrypt$n$r$p$salt$hash`, hex."""
    salt = salt if salt is not None else secrets.token_bytes(16)
    n, r, p = 2**14, 8, 1
    digest = hashlib.scrypt(password.encode("utf-8"), salt=salt, n=n, r=r, p=p, dklen=32)
    return f"scrypt${n}${r}${p}${salt.hex()}${digest.hex()}"


def check_password(password: str, stored: str) -> bool:
    try:
        scheme, n, r, p, salt, expected = stored.split("$")
        digest = hashlib.scrypt(
            password.encode("utf-8"), salt=bytes.fromhex(salt), n=int(n), r=int(r), p=int(p), dklen=32
        )
    except ValueError:
        return False
    return scheme == "scrypt" and hmac.compare_digest(digest.hex(), expected)


@dataclass(frozen=True)
class Audit:
    """An automatic verdict sampled for review (read from moderation.audit)."""

    verdict: Verdict


@dataclass(frozen=True)
class Filters:
    category: str | None = None
    surface: str | None = None
    stage: str | None = None


@dataclass(frozen=True)
class TaskView:
    """A task as the page and the API show it (the verdict parsed)."""

    id: int
    item_id: str
    kind: str
    status: str
    priority: float
    category: str | None
    surface: str | None
    stage: str | None
    text: str
    verdict: Verdict
    appeal_reason: str | None
    appeal_author: str | None
    created_at: datetime
    claimed_by: str | None
    claim_expires_at: datetime | None

    def claimed_by_other(self, reviewer: str, now: datetime) -> bool:
        return (
            self.claimed_by is not None
            and self.claimed_by != reviewer
            and self.claim_expires_at is not None
            and self.claim_expires_at > now
        )


@dataclass
class StageAgreement:
    stage: str
    decided: int = 0  # decided items this stage scored
    agreed: int = 0  # stage lean (score >= 0.5 → violating) matched the reviewer
    leaned_violating: int = 0
    confirmed_violating: int = 0  # of those, blocked by the reviewer

    @property
    def agreement(self) -> float | None:
        return self.agreed / self.decided if self.decided else None

    @property
    def precision(self) -> float | None:
        return self.confirmed_violating / self.leaned_violating if self.leaned_violating else None


@dataclass
class Stats:
    open_tasks: dict[str, int] = field(default_factory=dict)  # by kind
    claimed: int = 0
    oldest_open_age_s: float | None = None
    decisions_by_reviewer: dict[str, dict[str, int]] = field(default_factory=dict)  # reviewer → decision → n
    appeals_decided: int = 0
    overturned: int = 0
    unpublished: int = 0
    stages: list[StageAgreement] = field(default_factory=list)

    @property
    def queue_depth(self) -> int:
        return sum(self.open_tasks.values())

    @property
    def overturn_rate(self) -> float | None:
        return self.overturned / self.appeals_decided if self.appeals_decided else None


def _max_score(verdict: Verdict) -> float:
    return max(verdict.categories.values(), default=0.0)


def _top_category(verdict: Verdict) -> str | None:
    """The highest-scoring policy category (`flagged` only when the stages scored nothing else)."""
    named = {c: s for c, s in verdict.categories.items() if c != FLAGGED} or verdict.categories
    return max(named, key=named.__getitem__) if named else None


def human_verdict(record: ReviewDecision) -> Verdict:
    """The final verdict a decision makes: the settled verdict's trace plus the reviewer's entry."""
    settled = record.settles
    decision = Decision(record.decision)
    entry = TraceEntry(
        stage=HUMAN,
        stage_version=HUMAN_STAGE_VERSION,
        result=StageAction(decision.value),
        latency_ms=0.0,
        note=f"{'appeal ' + record.appeal_outcome.value if record.appeal_outcome else 'decided'} by {record.reviewer}",
        details={"decision_id": record.decision_id, "reviewer": record.reviewer},
    )
    return Verdict(
        id=record.id,
        decision=decision,
        categories=settled.categories,
        flagged_categories=list(record.categories),
        decided_by=HUMAN,
        reason=entry.note or "",
        trace=[*settled.trace, entry],
        policy_version=record.policy_version,
        thresholds_version=settled.thresholds_version,
        processed_at=record.decided_at,
        item=settled.item,
    )


class ReviewStore:
    def __init__(self, url: str, lease_s: float = 300.0) -> None:
        self.url = url
        self.lease = timedelta(seconds=lease_s)
        connect_args: dict[str, Any] = {}
        if url.startswith("sqlite"):
            connect_args = {"check_same_thread": False, "timeout": 30}
        self.engine = create_engine(url, connect_args=connect_args, pool_pre_ping=True)
        if url.startswith("sqlite"):
            event.listen(self.engine, "connect", _sqlite_pragmas)
        migrate(self.engine)
        self._sessions = sessionmaker(self.engine, expire_on_commit=False)

    @classmethod
    def from_settings(cls, settings: Settings) -> ReviewStore:
        return cls(database_url(settings), settings.review_lease_s)

    def close(self) -> None:
        self.engine.dispose()

    @contextmanager
    def _session(self) -> Iterator[Session]:
        with self._sessions.begin() as session:
            yield session

    # --- intake (the consumer) ---

    def ingest(
        self, records: Sequence[Verdict | Appeal | Audit], now: datetime | None = None
    ) -> list[ReviewError | None]:
        """Store a batch in one transaction; per record None, or why it cannot become a task."""
        now = now or utc_now()
        outcomes: list[ReviewError | None] = []
        with self._session() as session:
            for record in records:
                try:
                    if isinstance(record, Appeal):
                        self._appeal(session, record, now)
                    elif isinstance(record, Audit):
                        self._audit(session, record.verdict, now)
                    else:
                        self._verdict(session, record, now)
                    outcomes.append(None)
                except ReviewError as exc:
                    outcomes.append(exc)
        return outcomes

    def ingest_verdict(self, verdict: Verdict, now: datetime | None = None) -> bool:
        """A review verdict becomes a task; a block verdict is kept for appeals. True when something new."""
        with self._session() as session:
            return self._verdict(session, verdict, now or utc_now())

    def ingest_appeal(self, appeal: Appeal, now: datetime | None = None) -> bool:
        """An appealed block becomes an appeal task. Raises ReviewError when no block of the item is known."""
        with self._session() as session:
            return self._appeal(session, appeal, now or utc_now())

    def _verdict(self, session: Session, verdict: Verdict, now: datetime) -> bool:
        if verdict.decision is Decision.BLOCK:
            # A block older than the item's latest human decision is history (e.g. overturned since).
            latest = select(func.max(DecisionRow.decided_at)).where(DecisionRow.item_id == verdict.id)
            decided = _aware(session.scalar(latest))
            if decided is not None and decided > verdict.processed_at:
                return False
            if len(verdict.id) > MAX_ID_CHARS:
                raise ReviewError(f"item id longer than {MAX_ID_CHARS} characters")
            session.merge(BlockedVerdict(item_id=verdict.id, verdict_json=verdict.model_dump_json(), received_at=now))
            return True
        if verdict.decision is not Decision.REVIEW:
            return False
        stage = verdict.trace[-1].stage if verdict.trace else None
        return _add_task(session, _task(verdict, TaskKind.REVIEW, _max_score(verdict), stage, now))

    def _audit(self, session: Session, verdict: Verdict, now: datetime) -> bool:
        if verdict.decision is Decision.REVIEW:
            raise ReviewError("an audit copies an automatic verdict (allow or block), not a review verdict")
        return _add_task(session, _task(verdict, TaskKind.AUDIT, _max_score(verdict), verdict.decided_by, now))

    def _appeal(self, session: Session, appeal: Appeal, now: datetime) -> bool:
        blocked = session.get(BlockedVerdict, appeal.id)
        if blocked is None:
            raise ReviewError(f"no block verdict is known for item {appeal.id!r}: nothing to appeal")
        verdict = Verdict.model_validate_json(blocked.verdict_json)
        task = _task(verdict, TaskKind.APPEAL, APPEAL_PRIORITY_BOOST + _max_score(verdict), verdict.decided_by, now)
        task.appeal_reason, task.appeal_author = appeal.reason, appeal.author
        return _add_task(session, task)

    # --- the queue and claims ---

    def queue(self, filters: Filters = Filters(), limit: int = 100) -> tuple[list[TaskView], int]:
        """Open tasks, highest priority first then oldest; and how many match in all."""
        query = select(Task).where(Task.status == TaskStatus.OPEN)
        if filters.category:
            query = query.where(Task.category == filters.category)
        if filters.surface:
            query = query.where(Task.surface == filters.surface)
        if filters.stage:
            query = query.where(Task.stage == filters.stage)
        with self._session() as session:
            total = session.scalar(select(func.count()).select_from(query.subquery())) or 0
            rows = session.scalars(query.order_by(Task.priority.desc(), Task.created_at, Task.id).limit(limit)).all()
            return [_view(row) for row in rows], total

    def facets(self) -> dict[str, list[str]]:
        """The values the queue filters offer (from open tasks)."""
        with self._session() as session:
            return {
                name: sorted(
                    v
                    for v in session.scalars(
                        select(column).where(Task.status == TaskStatus.OPEN, column.is_not(None)).distinct()
                    )
                    if v
                )
                for name, column in (("category", Task.category), ("surface", Task.surface), ("stage", Task.stage))
            }

    def task(self, task_id: int) -> TaskView:
        with self._session() as session:
            row = session.get(Task, task_id)
            if row is None:
                raise ReviewError(f"no task {task_id}")
            return _view(row)

    def claim(self, task_id: int, reviewer: str, now: datetime | None = None) -> bool:
        """Take (or renew) the lease on an open task; False when another reviewer holds a live lease."""
        now = now or utc_now()
        with self._session() as session:
            result = session.execute(
                update(Task)
                .where(
                    Task.id == task_id,
                    Task.status == TaskStatus.OPEN,
                    (Task.claimed_by.is_(None)) | (Task.claim_expires_at <= now) | (Task.claimed_by == reviewer),
                )
                .values(claimed_by=reviewer, claim_expires_at=now + self.lease)
            )
            return bool(result.rowcount == 1)  # type: ignore[attr-defined]

    def release(self, task_id: int, reviewer: str) -> bool:
        """Give a claimed task back to the queue (skip)."""
        with self._session() as session:
            result = session.execute(
                update(Task)
                .where(Task.id == task_id, Task.status == TaskStatus.OPEN, Task.claimed_by == reviewer)
                .values(claimed_by=None, claim_expires_at=None)
            )
            return bool(result.rowcount == 1)  # type: ignore[attr-defined]

    def decide(
        self,
        task_id: int,
        reviewer: str,
        decision: Decision,
        categories: Sequence[str] = (),
        now: datetime | None = None,
    ) -> ReviewDecision:
        """Settle a task the reviewer holds a live claim on; the decision joins the outbox."""
        now = now or utc_now()
        if decision not in (Decision.ALLOW, Decision.BLOCK):
            raise ReviewError("a reviewer decides allow or block")
        categories = sorted(set(categories)) if decision is Decision.BLOCK else []
        if decision is Decision.BLOCK and not categories:
            raise ReviewError("a block needs at least one category")
        with self._session() as session:
            result = session.execute(
                update(Task)
                .where(
                    Task.id == task_id,
                    Task.status == TaskStatus.OPEN,
                    Task.claimed_by == reviewer,
                    Task.claim_expires_at > now,
                )
                .values(status=TaskStatus.DECIDED, decided_at=now)
            )
            if result.rowcount != 1:  # type: ignore[attr-defined]
                raise ReviewError(f"task {task_id} is not claimed by {reviewer} (claim it first, or it was decided)")
            task = session.get(Task, task_id)
            assert task is not None
            settled = Verdict.model_validate_json(task.verdict_json)
            appeal = task.kind == TaskKind.APPEAL
            outcome = None
            if appeal:
                outcome = AppealRuling.UPHELD if decision is Decision.BLOCK else AppealRuling.OVERTURNED
            record = ReviewDecision(
                decision_id=str(uuid.uuid4()),
                id=task.item_id,
                decision=decision.value,
                categories=categories,
                reviewer=reviewer,
                decided_at=now,
                policy_version=settled.policy_version,
                appeal=appeal,
                appeal_outcome=outcome,
                audit=task.kind == TaskKind.AUDIT,
                settles=settled,
            )
            session.add(
                DecisionRow(
                    id=record.decision_id,
                    task_id=task.id,
                    item_id=task.item_id,
                    decision=decision.value,
                    categories=json.dumps(categories),
                    reviewer=reviewer,
                    decided_at=now,
                    appeal_outcome=outcome.value if outcome else None,
                    record_json=record.model_dump_json(),
                    published_at=None,
                    feedback_done=False,
                )
            )
            session.flush()  # the decision row first: judgements and audit rows refer to it
            blocked = decision is Decision.BLOCK
            # Stages are judged once per item: not again when an appeal re-decides a human verdict.
            for entry in settled.trace if settled.decided_by != HUMAN else ():
                if entry.scores:
                    session.merge(
                        StageJudgement(
                            decision_id=record.decision_id,
                            stage=entry.stage,
                            max_score=max(entry.scores.values()),
                            human_blocked=blocked,
                        )
                    )
            # What an appeal is judged against from now on: the human verdict, or nothing if allowed.
            if blocked:
                session.merge(
                    BlockedVerdict(
                        item_id=task.item_id, verdict_json=human_verdict(record).model_dump_json(), received_at=now
                    )
                )
            else:
                session.execute(delete(BlockedVerdict).where(BlockedVerdict.item_id == task.item_id))
            return record

    # --- the outbox (the publisher) ---

    def unpublished(self, limit: int = 100) -> list[ReviewDecision]:
        return self._decisions_where(DecisionRow.published_at.is_(None), limit)

    def mark_published(self, decision_ids: Iterable[str], now: datetime | None = None) -> None:
        with self._session() as session:
            session.execute(
                update(DecisionRow).where(DecisionRow.id.in_(list(decision_ids))).values(published_at=now or utc_now())
            )

    def pending_feedback(self, limit: int = 100) -> list[ReviewDecision]:
        return self._decisions_where(DecisionRow.feedback_done.is_(False), limit)

    def _decisions_where(self, condition: ColumnElement[bool], limit: int) -> list[ReviewDecision]:
        """The oldest `limit` decisions meeting `condition` (the outbox and the feedback queue)."""
        with self._session() as session:
            rows = session.scalars(
                select(DecisionRow.record_json).where(condition).order_by(DecisionRow.decided_at).limit(limit)
            ).all()
            return [ReviewDecision.model_validate_json(row) for row in rows]

    def record_feedback(
        self, record: ReviewDecision, changes: Sequence[tuple[str, str]], now: datetime | None = None
    ) -> None:
        """Audit the bank changes (bank, action) a decision caused and mark its feedback done."""
        now = now or utc_now()
        with self._session() as session:
            for bank, action in changes:
                session.add(
                    BankAudit(
                        decision_id=record.decision_id,
                        item_id=record.id,
                        reviewer=record.reviewer,
                        bank=bank,
                        action=action[:256],
                        at=now,
                    )
                )
            session.execute(update(DecisionRow).where(DecisionRow.id == record.decision_id).values(feedback_done=True))

    def bank_audit(self, limit: int = 1000) -> list[BankAudit]:
        """The latest bank changes that decisions caused, newest first."""
        with self._session() as session:
            return list(session.scalars(select(BankAudit).order_by(BankAudit.id.desc()).limit(limit)).all())

    # --- feedback and figures ---

    def decisions(self, since: datetime | None = None) -> list[tuple[ReviewDecision, str]]:
        """Every decision (oldest first) with the item text."""
        query = select(DecisionRow.record_json, Task.text).join(Task, Task.id == DecisionRow.task_id)
        if since is not None:
            query = query.where(DecisionRow.decided_at >= since)
        with self._session() as session:
            rows = session.execute(query.order_by(DecisionRow.decided_at, DecisionRow.id)).all()
            return [(ReviewDecision.model_validate_json(record), text) for record, text in rows]

    def stats(self, now: datetime | None = None) -> Stats:
        now = now or utc_now()
        stats = Stats()
        with self._session() as session:
            open_ = Task.status == TaskStatus.OPEN
            for kind, count in session.execute(select(Task.kind, func.count()).where(open_).group_by(Task.kind)):
                stats.open_tasks[kind] = count
            stats.claimed = session.scalar(select(func.count()).where(open_, Task.claim_expires_at > now)) or 0
            oldest = _aware(session.scalar(select(func.min(Task.created_at)).where(open_)))
            stats.oldest_open_age_s = (now - oldest).total_seconds() if oldest else None
            for reviewer, decision, count in session.execute(
                select(DecisionRow.reviewer, DecisionRow.decision, func.count()).group_by(
                    DecisionRow.reviewer, DecisionRow.decision
                )
            ):
                stats.decisions_by_reviewer.setdefault(reviewer, {})[decision] = count
            for outcome, count in session.execute(
                select(DecisionRow.appeal_outcome, func.count())
                .where(DecisionRow.appeal_outcome.is_not(None))
                .group_by(DecisionRow.appeal_outcome)
            ):
                stats.appeals_decided += count
                if outcome == AppealRuling.OVERTURNED.value:
                    stats.overturned += count
            stats.unpublished = session.scalar(select(func.count()).where(DecisionRow.published_at.is_(None))) or 0
            leans = StageJudgement.max_score >= LEANS_VIOLATING
            for stage, decided, agreed, leaned, confirmed in session.execute(
                select(
                    StageJudgement.stage,
                    func.count(),
                    func.sum(_as_int(leans == StageJudgement.human_blocked)),
                    func.sum(_as_int(leans)),
                    func.sum(_as_int(leans & StageJudgement.human_blocked)),
                )
                .group_by(StageJudgement.stage)
                .order_by(StageJudgement.stage)
            ):
                stats.stages.append(
                    StageAgreement(stage, decided, int(agreed or 0), int(leaned or 0), int(confirmed or 0))
                )
        return stats

    def audit_pairs(self, limit: int) -> list[tuple[Decision, Decision]]:
        """(automatic, human) decisions of the latest decided audits, oldest first (for AuditPrecision)."""
        with self._session() as session:
            rows = session.scalars(
                select(DecisionRow.record_json)
                .join(Task, Task.id == DecisionRow.task_id)
                .where(Task.kind == TaskKind.AUDIT)
                .order_by(DecisionRow.decided_at.desc())
                .limit(limit)
            ).all()
        records = [ReviewDecision.model_validate_json(row) for row in reversed(rows)]
        return [(r.settles.decision, Decision(r.decision)) for r in records]

    # --- accounts ---

    def add_account(self, name: str, password: str, now: datetime | None = None) -> bool:
        """Create or reset an account; True when it is new."""
        if not name.strip() or len(name) > 128:
            raise ReviewError("an account name must be 1–128 characters")
        if len(password) < 8:
            raise ReviewError("a password must be at least 8 characters")
        with self._session() as session:
            existing = session.get(Account, name)
            if existing is not None:
                existing.password_hash = hash_password(password)
                return False
            session.add(Account(name=name, password_hash=hash_password(password), created_at=now or utc_now()))
            return True

    def accounts(self) -> list[tuple[str, datetime]]:
        with self._session() as session:
            return [
                (a.name, _aware(a.created_at) or a.created_at)
                for a in session.scalars(select(Account).order_by(Account.name))
            ]

    def authenticate(self, name: str, password: str) -> bool:
        with self._session() as session:
            account = session.get(Account, name)
        if account is None:
            check_password(password, _DUMMY_HASH)  # same work either way: no timing hint that a name exists
            return False
        return check_password(password, account.password_hash)


_DUMMY_HASH = hash_password("not a password", salt=b"\0" * 16)


def _task(verdict: Verdict, kind: str, priority: float, stage: str | None, now: datetime) -> Task:
    # A block is filed under the category it was blocked for; otherwise the highest-scoring one.
    category = verdict.flagged_categories[0] if verdict.flagged_categories else _top_category(verdict)
    if len(verdict.id) > MAX_ID_CHARS:
        raise ReviewError(f"item id longer than {MAX_ID_CHARS} characters")
    return Task(
        item_id=verdict.id,
        kind=kind,
        status=TaskStatus.OPEN,
        priority=priority,
        category=category[:64] if category else None,  # column widths: foreign names are cut, not fatal
        surface=verdict.item.surface if verdict.item else None,
        stage=stage[:64] if stage else None,
        text=verdict.item.text if verdict.item else "",
        verdict_json=verdict.model_dump_json(),
        created_at=now,
    )


def _add_task(session: Session, task: Task) -> bool:
    """Insert unless the item already has a task of this kind (a redelivery); the batch goes on either way."""
    try:
        with session.begin_nested():
            session.add(task)
    except IntegrityError:
        return False
    except DataError as exc:  # e.g. an over-long id from a foreign producer: refuse it, never block the stream
        raise ReviewError(f"cannot store the task: {exc.orig}") from None
    return True


def _as_int(condition: Any) -> Any:
    return case((condition, 1), else_=0)


def _sqlite_pragmas(connection: Any, record: Any) -> None:
    cursor = connection.cursor()
    cursor.execute("PRAGMA journal_mode=WAL")  # readers do not block the writer
    cursor.execute("PRAGMA busy_timeout=30000")
    cursor.execute("PRAGMA foreign_keys=ON")
    cursor.close()


def _view(row: Task) -> TaskView:
    return TaskView(
        id=row.id,
        item_id=row.item_id,
        kind=row.kind,
        status=row.status,
        priority=row.priority,
        category=row.category,
        surface=row.surface,
        stage=row.stage,
        text=row.text,
        verdict=Verdict.model_validate_json(row.verdict_json),
        appeal_reason=row.appeal_reason,
        appeal_author=row.appeal_author,
        created_at=_aware(row.created_at) or row.created_at,
        claimed_by=row.claimed_by,
        claim_expires_at=_aware(row.claim_expires_at),
    )
