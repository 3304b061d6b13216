"""identifier keys: one index, the key led by type and value hash

The primary key of resource_identifiers becomes (resource_type, value_hash, partner_id,
system_hash): the same columns, so the same uniqueness, in an order that also serves a search by
value alone and across partners, which had an index of its own (ix_resource_identifiers_value).
Each identifier stored now dirties a random page of one large B-tree instead of two.

SQLite cannot change a primary key in place: the table is copied in key order (a database with
1,000,000 stored resources holds 1.25M keys: 16 s on the 2-core VM of the benchmarks; PostgreSQL
builds the new key in 2.8 s there).

Revision ID: 0021
Revises: 0020
"""

from collections.abc import Sequence

from alembic import op

revision: str = "0021"
down_revision: str | None = "0020"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

_NEW = ("resource_type", "value_hash", "partner_id", "system_hash")
_OLD = ("partner_id", "resource_type", "value_hash", "system_hash")


def _set_key(key: Sequence[str]) -> None:
    if op.get_bind().dialect.name == "postgresql":
        op.execute(
            "ALTER TABLE resource_identifiers DROP CONSTRAINT resource_identifiers_pkey, "
            f"ADD CONSTRAINT resource_identifiers_pkey PRIMARY KEY ({', '.join(key)})"
        )
        return
    columns = "partner_id, resource_type, value_hash, system_hash, resource_id"
    op.execute(
        "CREATE TABLE resource_identifiers_new (partner_id VARCHAR(64) NOT NULL, "
        "resource_type VARCHAR(64) NOT NULL, value_hash VARCHAR(64) NOT NULL, "
        "system_hash VARCHAR(64) NOT NULL, resource_id VARCHAR(64) NOT NULL, "
        f"PRIMARY KEY ({', '.join(key)}))"
    )
    op.execute(
        f"INSERT INTO resource_identifiers_new ({columns}) "
        f"SELECT {columns} FROM resource_identifiers ORDER BY {', '.join(key)}"
    )
    op.execute("DROP TABLE resource_identifiers")  # its indexes go with it
    op.execute("ALTER TABLE resource_identifiers_new RENAME TO resource_identifiers")
    op.create_index(
        "ix_resource_identifiers_resource", "resource_identifiers", ["resource_type", "resource_id"]
    )


def upgrade() -> None:
    op.drop_index("ix_resource_identifiers_value", table_name="resource_identifiers")
    _set_key(_NEW)


def downgrade() -> None:
    _set_key(_OLD)
    op.create_index(
        "ix_resource_identifiers_value", "resource_identifiers", ["resource_type", "value_hash"]
    )
