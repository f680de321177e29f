"""Optimization runs become jobs (progress, owner, heartbeat, cancel request); API keys.

Revision ID: 0002
Revises: 0001
"""
import sqlalchemy as sa
from alembic import op

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None

_RUN_COLUMNS = ("stage", "progress", "candidates", "owner", "started_at", "heartbeat_at",
                "cancel_requested", "error_status")


def upgrade() -> None:
    with op.batch_alter_table("optimization_runs") as t:
        t.add_column(sa.Column("stage", sa.String(300), nullable=True))
        t.add_column(sa.Column("progress", sa.Float, nullable=True))
        t.add_column(sa.Column("candidates", sa.JSON, nullable=True))
        t.add_column(sa.Column("owner", sa.String(200), nullable=True))
        t.add_column(sa.Column("started_at", sa.DateTime(timezone=True), nullable=True))
        t.add_column(sa.Column("heartbeat_at", sa.DateTime(timezone=True), nullable=True))
        t.add_column(sa.Column("cancel_requested", sa.Boolean, nullable=False,
                               server_default=sa.false()))
        t.add_column(sa.Column("error_status", sa.Integer, nullable=True))
        t.create_index("ix_optimization_runs_status", ["status"])
    op.create_table(
        "api_keys",
        sa.Column("id", sa.String(32), primary_key=True),
        sa.Column("name", sa.String(128), nullable=False),
        sa.Column("secret_sha256", sa.String(64), nullable=False),
        sa.Column("scopes", sa.JSON, nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True)),
        sa.Column("last_used_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("revoked_at", sa.DateTime(timezone=True), nullable=True),
    )


def downgrade() -> None:
    op.drop_table("api_keys")
    with op.batch_alter_table("optimization_runs") as t:
        t.drop_index("ix_optimization_runs_status")
        for name in _RUN_COLUMNS:
            t.drop_column(name)
