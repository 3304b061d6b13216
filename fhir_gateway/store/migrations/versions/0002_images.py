"""image instances (DICOM index per case)

Revision ID: 0002
Revises: 0001
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

import fhir_gateway.store.models

revision: str = "0002"
down_revision: str | None = "0001"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table(
        "image_instances",
        sa.Column("case_id", sa.String(length=36), nullable=False),
        sa.Column("sop_uid", sa.String(length=64), nullable=False),
        sa.Column("study_uid", sa.String(length=64), nullable=False),
        sa.Column("series_uid", sa.String(length=64), nullable=False),
        sa.Column("sop_class_uid", sa.String(length=64), nullable=False),
        sa.Column("transfer_syntax_uid", sa.String(length=64), nullable=False),
        sa.Column("sha256", sa.String(length=64), nullable=False),
        sa.Column("size", sa.BigInteger(), nullable=False),
        sa.Column("backend", sa.String(length=16), nullable=False),
        sa.Column("orthanc_id", sa.String(length=64), nullable=True),
        sa.Column("source", sa.String(length=512), nullable=False),
        sa.Column(
            "stored_at", fhir_gateway.store.models.UTCDateTime(timezone=True), nullable=False
        ),
        sa.ForeignKeyConstraint(["case_id"], ["cases.id"]),
        sa.PrimaryKeyConstraint("case_id", "sop_uid"),
    )
    with op.batch_alter_table("image_instances", schema=None) as batch_op:
        batch_op.create_index(
            "ix_image_instances_series", ["case_id", "study_uid", "series_uid"], unique=False
        )
        batch_op.create_index(
            batch_op.f("ix_image_instances_sha256"), ["sha256"], unique=False
        )


def downgrade() -> None:
    with op.batch_alter_table("image_instances", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_image_instances_sha256"))
        batch_op.drop_index("ix_image_instances_series")
    op.drop_table("image_instances")
