"""normalised case bundles

Revision ID: 0005
Revises: 0003
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

import fhir_gateway.store.models

revision: str = "0005"
down_revision: str | None = "0003"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table(
        "normalised_resources",
        sa.Column("case_id", sa.String(length=36), nullable=False),
        sa.Column("position", sa.Integer(), nullable=False),
        sa.Column("resource_type", sa.String(length=64), nullable=False),
        sa.Column("resource_id", sa.String(length=64), nullable=False),
        sa.Column("body", sa.Text(), nullable=False),
        sa.ForeignKeyConstraint(["case_id"], ["cases.id"]),
        sa.PrimaryKeyConstraint("case_id", "position"),
    )
    op.create_table(
        "case_bundles",
        sa.Column("case_id", sa.String(length=36), nullable=False),
        sa.Column("patient_id", sa.String(length=64), nullable=False),
        sa.Column("base_url", sa.String(length=512), nullable=False),
        sa.Column("etag", sa.String(length=80), nullable=False),
        sa.Column("resource_count", sa.Integer(), nullable=False),
        sa.Column("counts", fhir_gateway.store.models.JsonText(), nullable=False),
        sa.Column("summary", fhir_gateway.store.models.JsonText(), nullable=False),
        sa.Column("issues", fhir_gateway.store.models.JsonText(), nullable=False),
        sa.Column("sources", fhir_gateway.store.models.JsonText(), nullable=False),
        sa.Column(
            "built_at", fhir_gateway.store.models.UTCDateTime(timezone=True), nullable=False
        ),
        sa.ForeignKeyConstraint(["case_id"], ["cases.id"]),
        sa.PrimaryKeyConstraint("case_id"),
    )


def downgrade() -> None:
    op.drop_table("case_bundles")
    op.drop_table("normalised_resources")
