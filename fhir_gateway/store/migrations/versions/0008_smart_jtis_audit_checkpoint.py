"""SMART jti replay cache in the database; the audit chain's signed checkpoint

Revision ID: 0008
Revises: 0005
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

import fhir_gateway.store.models

revision: str = "0008"
down_revision: str | None = "0007"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table(
        "smart_jtis",
        sa.Column("client_id", sa.String(length=256), nullable=False),
        sa.Column("jti_sha256", sa.String(length=64), nullable=False),
        sa.Column(
            "expires_at", fhir_gateway.store.models.UTCDateTime(timezone=True), nullable=False
        ),
        sa.PrimaryKeyConstraint("client_id", "jti_sha256"),
    )
    op.create_index("ix_smart_jtis_expires_at", "smart_jtis", ["expires_at"])
    op.create_table(
        "audit_checkpoint",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("keyed_from", sa.Integer(), nullable=False),
        sa.Column("count", sa.Integer(), nullable=False),
        sa.Column("last_id", sa.Integer(), nullable=False),
        sa.Column("last_hash", sa.String(length=64), nullable=False),
        sa.Column("mac", sa.String(length=64), nullable=False),
        sa.PrimaryKeyConstraint("id"),
    )


def downgrade() -> None:
    op.drop_table("audit_checkpoint")
    op.drop_index("ix_smart_jtis_expires_at", table_name="smart_jtis")
    op.drop_table("smart_jtis")
