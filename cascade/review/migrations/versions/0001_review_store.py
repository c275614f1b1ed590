"""The review store: tasks, blocked verdicts, decisions (outbox), stage judgements, accounts, bank audit.

Revision ID: 0001
Revises:
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0001"
down_revision = None


def _when(name: str, nullable: bool = False) -> sa.Column:
    return sa.Column(name, sa.DateTime(timezone=True), nullable=nullable)


def upgrade() -> None:
    op.create_table(
        "review_tasks",
        sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
        sa.Column("item_id", sa.String(512), nullable=False),
        sa.Column("kind", sa.String(16), nullable=False),
        sa.Column("status", sa.String(16), nullable=False),
        sa.Column("priority", sa.Float, nullable=False),
        sa.Column("category", sa.String(64)),
        sa.Column("surface", sa.String(32)),
        sa.Column("stage", sa.String(64)),
        sa.Column("text", sa.Text, nullable=False),
        sa.Column("verdict_json", sa.Text, nullable=False),
        sa.Column("appeal_reason", sa.Text),
        sa.Column("appeal_author", sa.String(512)),
        _when("created_at"),
        sa.Column("claimed_by", sa.String(128)),
        _when("claim_expires_at", nullable=True),
        _when("decided_at", nullable=True),
        sa.UniqueConstraint("item_id", "kind", name="uq_review_tasks_item_kind"),
    )
    op.create_index("ix_review_tasks_queue", "review_tasks", ["status", "priority", "created_at"])
    op.create_table(
        "blocked_verdicts",
        sa.Column("item_id", sa.String(512), primary_key=True),
        sa.Column("verdict_json", sa.Text, nullable=False),
        _when("received_at"),
    )
    op.create_table(
        "review_decisions",
        sa.Column("id", sa.String(36), primary_key=True),
        sa.Column("task_id", sa.Integer, sa.ForeignKey("review_tasks.id"), nullable=False),
        sa.Column("item_id", sa.String(512), nullable=False, index=True),
        sa.Column("decision", sa.String(8), nullable=False),
        sa.Column("categories", sa.Text, nullable=False),
        sa.Column("reviewer", sa.String(128), nullable=False, index=True),
        _when("decided_at"),
        sa.Column("appeal_outcome", sa.String(16)),
        sa.Column("record_json", sa.Text, nullable=False),
        _when("published_at", nullable=True),
        sa.Column("feedback_done", sa.Boolean, nullable=False),
    )
    op.create_index("ix_review_decisions_decided_at", "review_decisions", ["decided_at"])
    op.create_index("ix_review_decisions_unpublished", "review_decisions", ["published_at"])
    op.create_table(
        "review_stage_judgements",
        sa.Column("decision_id", sa.String(36), sa.ForeignKey("review_decisions.id"), primary_key=True),
        sa.Column("stage", sa.String(64), primary_key=True),
        sa.Column("max_score", sa.Float, nullable=False),
        sa.Column("human_blocked", sa.Boolean, nullable=False),
    )
    op.create_table(
        "review_accounts",
        sa.Column("name", sa.String(128), primary_key=True),
        sa.Column("password_hash", sa.String(256), nullable=False),
        _when("created_at"),
    )
    op.create_table(
        "review_bank_audit",
        sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
        sa.Column("decision_id", sa.String(36), sa.ForeignKey("review_decisions.id"), nullable=False, index=True),
        sa.Column("item_id", sa.String(512), nullable=False),
        sa.Column("reviewer", sa.String(128), nullable=False),
        sa.Column("bank", sa.String(32), nullable=False),
        sa.Column("action", sa.String(256), nullable=False),
        _when("at"),
    )


def downgrade() -> None:
    for table in (
        "review_bank_audit",
        "review_accounts",
        "review_stage_judgements",
        "review_decisions",
        "blocked_verdicts",
        "review_tasks",
    ):
        op.drop_table(table)
