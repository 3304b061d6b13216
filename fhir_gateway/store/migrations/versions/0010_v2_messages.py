"""HL7 v2 messages received over MLLP

Revision ID: 0010
Revises: 0008
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

import fhir_gateway.store.models

revision: str = "0010"
down_revision: str | None = "0009"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table(
        "v2_messages",
        sa.Column("id", sa.String(length=36), nullable=False),
        sa.Column("sending_application", sa.String(length=227), nullable=False),
        sa.Column("sending_facility", sa.String(length=227), nullable=False),
        sa.Column("control_id", sa.String(length=199), nullable=False),
        sa.Column("message_type", sa.String(length=32), nullable=False),
        sa.Column(
            "received_at", fhir_gateway.store.models.UTCDateTime(timezone=True), nullable=False
        ),
        sa.Column("sha256", sa.String(length=64), nullable=False),
        sa.Column("size", sa.Integer(), nullable=False),
        sa.Column("body", sa.LargeBinary(), nullable=False),
        sa.Column("state", sa.String(length=16), nullable=False),
        sa.Column("reason", sa.String(length=64), nullable=True),
        sa.Column("case_id", sa.String(length=36), nullable=True),
        sa.Column("decided_by", sa.String(length=256), nullable=True),
        sa.Column(
            "decided_at", fhir_gateway.store.models.UTCDateTime(timezone=True), nullable=True
        ),
        sa.ForeignKeyConstraint(["case_id"], ["cases.id"]),
        sa.PrimaryKeyConstraint("id"),
        sa.UniqueConstraint(
            "sending_application", "sending_facility", "control_id", name="uq_v2_messages_control"
        ),
    )
    op.create_index("ix_v2_messages_case_id", "v2_messages", ["case_id"])
    op.create_index("ix_v2_messages_state", "v2_messages", ["state"])


def downgrade() -> None:
    op.drop_index("ix_v2_messages_state", table_name="v2_messages")
    op.drop_index("ix_v2_messages_case_id", table_name="v2_messages")
    op.drop_table("v2_messages")
