"""Image index rows keep the instance's DICOM JSON, taken at ingest (per-case DICOMweb serves it)

Revision ID: 0013
Revises: 0008
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0013"
down_revision: str | None = "0008"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.batch_alter_table("image_instances") as batch:
        batch.add_column(sa.Column("dicom_json", sa.Text(), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("image_instances") as batch:
        batch.drop_column("dicom_json")
