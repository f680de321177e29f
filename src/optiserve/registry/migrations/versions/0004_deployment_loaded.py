"""Deployments remember whether they are loaded: Triton's unload keeps a model's settings, and
a deployment unloaded over the repository API stays unloaded across restarts until loaded.

Revision ID: 0004
Revises: 0003
"""
import sqlalchemy as sa
from alembic import op

revision = "0004"
down_revision = "0003"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("deployments") as batch:
        batch.add_column(sa.Column("loaded", sa.Boolean, nullable=False,
                                   server_default=sa.true()))


def downgrade() -> None:
    with op.batch_alter_table("deployments") as batch:
        batch.drop_column("loaded")
