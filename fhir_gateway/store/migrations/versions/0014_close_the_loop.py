"""Close the loop: subscriptions and their numbered events, further report recipients,
follow-up questions

Revision ID: 0014
Revises: 0008
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

import fhir_gateway.store.models

revision: str = "0014"
down_revision: str | None = "0013"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

_dt = fhir_gateway.store.models.UTCDateTime
_json = fhir_gateway.store.models.JsonText


def upgrade() -> None:
    op.create_table(
        "subscriptions",
        sa.Column("id", sa.String(length=64), nullable=False),
        sa.Column("partner_id", sa.String(length=64), nullable=False),
        sa.Column("status", sa.String(length=16), nullable=False),
        sa.Column("events_since_start", sa.Integer(), nullable=False),
        sa.Column("last_sent_at", _dt(timezone=True), nullable=True),
        sa.Column("sender", sa.String(length=64), nullable=True),
        sa.Column("sender_until", _dt(timezone=True), nullable=True),
        sa.Column("last_error", sa.Text(), nullable=True),
        sa.Column("created_at", _dt(timezone=True), nullable=False),
        sa.Column("updated_at", _dt(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("id"),
    )
    op.create_index("ix_subscriptions_partner_id", "subscriptions", ["partner_id"])
    op.create_table(
        "subscription_events",
        sa.Column("subscription_id", sa.String(length=64), nullable=False),
        sa.Column("event_number", sa.Integer(), nullable=False),
        sa.Column("focus", sa.String(length=128), nullable=False),
        sa.Column("resource", _json(), nullable=False),
        sa.Column("occurred_at", _dt(timezone=True), nullable=False),
        sa.Column("sent_at", _dt(timezone=True), nullable=True),
        sa.ForeignKeyConstraint(["subscription_id"], ["subscriptions.id"]),
        sa.PrimaryKeyConstraint("subscription_id", "event_number"),
    )
    op.create_table(
        "questions",
        sa.Column("id", sa.String(length=36), nullable=False),
        sa.Column("case_id", sa.String(length=36), nullable=False),
        sa.Column("communication_id", sa.String(length=64), nullable=False),
        sa.Column("text", sa.Text(), nullable=False),
        sa.Column("status", sa.String(length=16), nullable=False),
        sa.Column("asked_at", _dt(timezone=True), nullable=False),
        sa.Column("answer", sa.Text(), nullable=True),
        sa.Column("answered_by", sa.String(length=256), nullable=True),
        sa.Column("answered_at", _dt(timezone=True), nullable=True),
        sa.Column("report_version", sa.Integer(), nullable=True),
        sa.Column("reply_id", sa.String(length=64), nullable=True),
        sa.ForeignKeyConstraint(["case_id"], ["cases.id"]),
        sa.PrimaryKeyConstraint("id"),
        sa.UniqueConstraint("communication_id"),
    )
    op.create_index("ix_questions_case_id", "questions", ["case_id"])
    with op.batch_alter_table("deliveries") as batch:
        batch.add_column(
            sa.Column(
                "recipient",
                sa.String(length=64),
                nullable=False,
                server_default="destination",
            )
        )
        batch.drop_constraint("uq_deliveries_report_version", type_="unique")
        batch.create_unique_constraint(
            "uq_deliveries_report_version", ["report_id", "report_version", "recipient"]
        )


def downgrade() -> None:
    with op.batch_alter_table("deliveries") as batch:
        batch.drop_constraint("uq_deliveries_report_version", type_="unique")
        batch.create_unique_constraint(
            "uq_deliveries_report_version", ["report_id", "report_version"]
        )
        batch.drop_column("recipient")
    op.drop_index("ix_questions_case_id", table_name="questions")
    op.drop_table("questions")
    op.drop_table("subscription_events")
    op.drop_index("ix_subscriptions_partner_id", table_name="subscriptions")
    op.drop_table("subscriptions")
