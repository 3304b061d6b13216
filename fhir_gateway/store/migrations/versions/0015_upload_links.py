"""Patient upload links (token stored as its SHA-256) and the files each link received

Revision ID: 0015
Revises: 0014
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

import fhir_gateway.store.models

revision: str = "0015"
down_revision: str | None = "0014"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

_dt = fhir_gateway.store.models.UTCDateTime


def upgrade() -> None:
    op.create_table(
        "upload_links",
        sa.Column("id", sa.String(length=36), nullable=False),
        sa.Column("case_id", sa.String(length=36), nullable=False),
        sa.Column("token_sha256", sa.String(length=64), nullable=False),
        sa.Column("created_by", sa.String(length=256), nullable=False),
        sa.Column("created_at", _dt(timezone=True), nullable=False),
        sa.Column("expires_at", _dt(timezone=True), nullable=False),
        sa.Column("revoked_at", _dt(timezone=True), nullable=True),
        sa.Column("revoked_by", sa.String(length=256), nullable=True),
        sa.ForeignKeyConstraint(["case_id"], ["cases.id"]),
        sa.PrimaryKeyConstraint("id"),
        sa.UniqueConstraint("token_sha256"),
    )
    op.create_index("ix_upload_links_case_id", "upload_links", ["case_id"])
    op.create_table(
        "upload_link_files",
        sa.Column("id", sa.Integer(), autoincrement=True, nullable=False),
        sa.Column("link_id", sa.String(length=36), nullable=False),
        sa.Column("name", sa.String(length=1024), nullable=False),
        sa.Column("result", sa.String(length=16), nullable=False),
        sa.Column("kind", sa.String(length=32), nullable=False),
        sa.Column("reason", sa.Text(), nullable=True),
        sa.Column("instances", sa.Integer(), nullable=False),
        sa.Column("received_at", _dt(timezone=True), nullable=False),
        sa.ForeignKeyConstraint(["link_id"], ["upload_links.id"]),
        sa.PrimaryKeyConstraint("id"),
    )
    op.create_index("ix_upload_link_files_link_id", "upload_link_files", ["link_id"])


def downgrade() -> None:
    op.drop_index("ix_upload_link_files_link_id", table_name="upload_link_files")
    op.drop_table("upload_link_files")
    op.drop_index("ix_upload_links_case_id", table_name="upload_links")
    op.drop_table("upload_links")
