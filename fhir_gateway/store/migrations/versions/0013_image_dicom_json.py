"""Image index rows keep the instance's DICOM JSON, taken at ingest (per-case DICOMweb serves
it); the case bundle state keeps the mark of the inputs it was built from (one build per change)

Revision ID: 0013
Revises: 0008
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0013"
down_revision: str | None = "0010"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.batch_alter_table("image_instances") as batch:
        batch.add_column(sa.Column("dicom_json", sa.Text(), nullable=True))
    with op.batch_alter_table("case_bundles") as batch:
        batch.add_column(sa.Column("inputs_mark", sa.String(length=512), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("case_bundles") as batch:
        batch.drop_column("inputs_mark")
    with op.batch_alter_table("image_instances") as batch:
        batch.drop_column("dicom_json")
