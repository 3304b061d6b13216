"""identifier keys unique per partner (hashed, any length); one case per ServiceRequest

Revision ID: 0006
Revises: 0005
"""

import hashlib
import json
from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0006"
down_revision: str | None = "0005"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def _sha(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def upgrade() -> None:
    op.drop_table("resource_identifiers")  # its index goes with it
    table = op.create_table(
        "resource_identifiers",
        sa.Column("partner_id", sa.String(length=64), nullable=False),
        sa.Column("resource_type", sa.String(length=64), nullable=False),
        sa.Column("value_hash", sa.String(length=64), nullable=False),
        sa.Column("system_hash", sa.String(length=64), nullable=False),
        sa.Column("resource_id", sa.String(length=64), nullable=False),
        sa.PrimaryKeyConstraint("partner_id", "resource_type", "value_hash", "system_hash"),
    )
    op.create_index(
        "ix_resource_identifiers_resource",
        "resource_identifiers",
        ["resource_type", "resource_id"],
    )
    op.create_index(
        "ix_resource_identifiers_value", "resource_identifiers", ["resource_type", "value_hash"]
    )
    # Re-index what is stored; where earlier check-then-insert let duplicates in, the oldest
    # resource keeps the identifier (the later ones stay readable by id).
    conn = op.get_bind()
    rows = conn.execute(
        sa.text(
            "SELECT resource_type, id, partner_id, body FROM fhir_resources "
            "ORDER BY last_updated, id"
        )
    )
    seen: set[tuple[str, str, str, str]] = set()
    batch: list[dict[str, str]] = []
    for rtype, rid, partner, body in rows:
        for ident in json.loads(body).get("identifier") or []:
            if not isinstance(ident, dict) or not ident.get("value"):
                continue
            key = (partner or "", rtype, _sha(str(ident["value"])), _sha(ident.get("system") or ""))
            if key in seen:
                continue
            seen.add(key)
            batch.append(
                {
                    "partner_id": key[0],
                    "resource_type": rtype,
                    "value_hash": key[2],
                    "system_hash": key[3],
                    "resource_id": rid,
                }
            )
    if batch:
        op.bulk_insert(table, batch)
    with op.batch_alter_table("cases", schema=None) as batch_op:
        batch_op.create_unique_constraint("uq_cases_service_request", ["service_request_id"])


def downgrade() -> None:
    with op.batch_alter_table("cases", schema=None) as batch_op:
        batch_op.drop_constraint("uq_cases_service_request", type_="unique")
    op.drop_table("resource_identifiers")
    op.create_table(
        "resource_identifiers",
        sa.Column("resource_type", sa.String(length=64), nullable=False),
        sa.Column("resource_id", sa.String(length=64), nullable=False),
        sa.Column("system", sa.String(length=512), nullable=False),
        sa.Column("value", sa.String(length=512), nullable=False),
        sa.PrimaryKeyConstraint("resource_type", "resource_id", "system", "value"),
    )
    op.create_index(
        "ix_resource_identifiers_lookup", "resource_identifiers", ["resource_type", "value", "system"]
    )
