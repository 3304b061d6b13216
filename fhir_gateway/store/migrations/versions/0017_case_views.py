"""The case view: what the case page and GET /cases/{id}/timeline show, derived from the bundle
once at normalisation and stored beside it (cases normalised earlier derive it on first read)

Revision ID: 0017
Revises: 0015
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

import fhir_gateway.store.models

revision: str = "0017"
down_revision: str | None = "0015"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

_dt = fhir_gateway.store.models.UTCDateTime
_json = fhir_gateway.store.models.JsonText


def upgrade() -> None:
    op.create_table(
        "case_views",
        sa.Column("case_id", sa.String(length=36), nullable=False),
        sa.Column("etag", sa.String(length=80), nullable=False),
        sa.Column("version", sa.Integer(), nullable=False),
        sa.Column("built_at", _dt(timezone=True), nullable=False),
        sa.Column("glance", _json(), nullable=False),
        sa.Column("page", _json(), nullable=False),
        sa.Column("timeline", sa.Text(), nullable=False),  # large: last (SQLite reads in order)
        sa.ForeignKeyConstraint(["case_id"], ["cases.id"]),
        sa.PrimaryKeyConstraint("case_id"),
    )


def downgrade() -> None:
    op.drop_table("case_views")
