"""reports and deliveries

Revision ID: 0003
Revises: 0002
Create Date: 2026-11-24 22:20:00
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

import fhir_gateway.store.models


revision: str = '0003'
down_revision: str | None = '0002'
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table('reports',
    sa.Column('id', sa.String(length=36), nullable=False),
    sa.Column('case_id', sa.String(length=36), nullable=False),
    sa.Column('kind', sa.String(length=32), nullable=False),
    sa.Column('status', sa.String(length=16), nullable=False),
    sa.Column('draft', fhir_gateway.store.models.JsonText(), nullable=False),
    sa.Column('draft_changed', sa.Boolean(), nullable=False),
    sa.Column('version', sa.Integer(), nullable=False),
    sa.Column('fhir_status', sa.String(length=20), nullable=True),
    sa.Column('diagnostic_report', fhir_gateway.store.models.JsonText(), nullable=True),
    sa.Column('identifier_system', sa.String(length=512), nullable=False),
    sa.Column('identifier_value', sa.String(length=256), nullable=False),
    sa.Column('author', sa.String(length=256), nullable=False),
    sa.Column('dest_type', sa.String(length=64), nullable=True),
    sa.Column('dest_id', sa.String(length=128), nullable=True),
    sa.Column('dest_version', sa.String(length=64), nullable=True),
    sa.Column('created_at', fhir_gateway.store.models.UTCDateTime(timezone=True), nullable=False),
    sa.Column('updated_at', fhir_gateway.store.models.UTCDateTime(timezone=True), nullable=False),
    sa.ForeignKeyConstraint(['case_id'], ['cases.id'], ),
    sa.PrimaryKeyConstraint('id'),
    sa.UniqueConstraint('case_id')
    )
    op.create_table('deliveries',
    sa.Column('id', sa.String(length=36), nullable=False),
    sa.Column('report_id', sa.String(length=36), nullable=False),
    sa.Column('case_id', sa.String(length=36), nullable=False),
    sa.Column('report_version', sa.Integer(), nullable=False),
    sa.Column('action', sa.String(length=16), nullable=False),
    sa.Column('status', sa.String(length=16), nullable=False),
    sa.Column('attempts', sa.Integer(), nullable=False),
    sa.Column('last_status_code', sa.Integer(), nullable=True),
    sa.Column('last_outcome', fhir_gateway.store.models.JsonText(), nullable=True),
    sa.Column('last_error', sa.Text(), nullable=True),
    sa.Column('next_retry_at', fhir_gateway.store.models.UTCDateTime(timezone=True), nullable=True),
    sa.Column('server_type', sa.String(length=64), nullable=True),
    sa.Column('server_id', sa.String(length=128), nullable=True),
    sa.Column('server_version', sa.String(length=64), nullable=True),
    sa.Column('fallback_used', sa.Boolean(), nullable=False),
    sa.Column('job_id', sa.String(length=36), nullable=True),
    sa.Column('created_at', fhir_gateway.store.models.UTCDateTime(timezone=True), nullable=False),
    sa.Column('updated_at', fhir_gateway.store.models.UTCDateTime(timezone=True), nullable=False),
    sa.Column('delivered_at', fhir_gateway.store.models.UTCDateTime(timezone=True), nullable=True),
    sa.ForeignKeyConstraint(['case_id'], ['cases.id'], ),
    sa.ForeignKeyConstraint(['report_id'], ['reports.id'], ),
    sa.PrimaryKeyConstraint('id'),
    sa.UniqueConstraint('report_id', 'report_version', name='uq_deliveries_report_version')
    )
    with op.batch_alter_table('deliveries', schema=None) as batch_op:
        batch_op.create_index(batch_op.f('ix_deliveries_case_id'), ['case_id'], unique=False)
        batch_op.create_index(batch_op.f('ix_deliveries_report_id'), ['report_id'], unique=False)
        batch_op.create_index(batch_op.f('ix_deliveries_status'), ['status'], unique=False)


def downgrade() -> None:
    with op.batch_alter_table('deliveries', schema=None) as batch_op:
        batch_op.drop_index(batch_op.f('ix_deliveries_status'))
        batch_op.drop_index(batch_op.f('ix_deliveries_report_id'))
        batch_op.drop_index(batch_op.f('ix_deliveries_case_id'))
    op.drop_table('deliveries')
    op.drop_table('reports')
