"""The review store's tables (SQLAlchemy 2 ORM). Alembic migrations under `migrations/` create them."""

from __future__ import annotations

from datetime import datetime

from sqlalchemy import Boolean, DateTime, Float, ForeignKey, Index, Integer, String, Text, UniqueConstraint
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column


class Base(DeclarativeBase):
    pass


class TaskKind:
    REVIEW = "review"  # the cascade could not settle the item
    APPEAL = "appeal"  # an appealed block
    AUDIT = "audit"  # a sampled automatic verdict (moderation.audit, docs/drift.md)


class TaskStatus:
    OPEN = "open"
    DECIDED = "decided"


class Task(Base):
    """One item waiting for (or settled by) a reviewer. One task per item and kind: redeliveries add nothing."""

    __tablename__ = "review_tasks"
    __table_args__ = (
        UniqueConstraint("item_id", "kind", name="uq_review_tasks_item_kind"),
        Index("ix_review_tasks_queue", "status", "priority", "created_at"),
    )

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    item_id: Mapped[str] = mapped_column(String(512))
    kind: Mapped[str] = mapped_column(String(16))
    status: Mapped[str] = mapped_column(String(16), default=TaskStatus.OPEN)
    priority: Mapped[float] = mapped_column(Float)
    category: Mapped[str | None] = mapped_column(String(64))  # highest-scoring category
    surface: Mapped[str | None] = mapped_column(String(32))
    stage: Mapped[str | None] = mapped_column(String(64))  # the last stage the item reached
    text: Mapped[str] = mapped_column(Text)
    verdict_json: Mapped[str] = mapped_column(Text)  # the whole verdict: trace, scores, neighbours, rationale
    appeal_reason: Mapped[str | None] = mapped_column(Text)
    appeal_author: Mapped[str | None] = mapped_column(String(512))
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))
    claimed_by: Mapped[str | None] = mapped_column(String(128))
    claim_expires_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    decided_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))


class BlockedVerdict(Base):
    """The latest block verdict per item (cascade or human): what an appeal is judged against."""

    __tablename__ = "blocked_verdicts"

    item_id: Mapped[str] = mapped_column(String(512), primary_key=True)
    verdict_json: Mapped[str] = mapped_column(Text)
    received_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))


class DecisionRow(Base):
    """A reviewer's decision; `published_at` is null until it is on the topics (an outbox)."""

    __tablename__ = "review_decisions"
    __table_args__ = (Index("ix_review_decisions_unpublished", "published_at"),)

    id: Mapped[str] = mapped_column(String(36), primary_key=True)
    task_id: Mapped[int] = mapped_column(ForeignKey("review_tasks.id"))
    item_id: Mapped[str] = mapped_column(String(512), index=True)
    decision: Mapped[str] = mapped_column(String(8))
    categories: Mapped[str] = mapped_column(Text)  # JSON list
    reviewer: Mapped[str] = mapped_column(String(128), index=True)
    decided_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), index=True)
    appeal_outcome: Mapped[str | None] = mapped_column(String(16))
    record_json: Mapped[str] = mapped_column(Text)  # the ReviewDecision as published
    published_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    feedback_done: Mapped[bool] = mapped_column(Boolean, default=False)


class StageJudgement(Base):
    """What one stage leaned to on a decided item, against the reviewer's label: live per-stage precision."""

    __tablename__ = "review_stage_judgements"

    decision_id: Mapped[str] = mapped_column(ForeignKey("review_decisions.id"), primary_key=True)
    stage: Mapped[str] = mapped_column(String(64), primary_key=True)
    max_score: Mapped[float] = mapped_column(Float)
    human_blocked: Mapped[bool] = mapped_column(Boolean)


class Account(Base):
    __tablename__ = "review_accounts"

    name: Mapped[str] = mapped_column(String(128), primary_key=True)
    password_hash: Mapped[str] = mapped_column(String(256))
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))


class BankAudit(Base):
    """Every bank change a decision caused: who, when, which decision, which bank, what happened."""

    __tablename__ = "review_bank_audit"

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    decision_id: Mapped[str] = mapped_column(ForeignKey("review_decisions.id"), index=True)
    item_id: Mapped[str] = mapped_column(String(512))
    reviewer: Mapped[str] = mapped_column(String(128))
    bank: Mapped[str] = mapped_column(String(32))
    action: Mapped[str] = mapped_column(String(256))
    at: Mapped[datetime] = mapped_column(DateTime(timezone=True))
