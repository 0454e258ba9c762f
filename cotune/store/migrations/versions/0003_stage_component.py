"""Stages per component: ``stages.component``, and the stage key that includes it.

Revision ID: 0003_stage_component
Revises: 0002_accounts
Create Date: 2025-01-03

Written by hand; must match ``StageRow`` in ``cotune/store/models.py`` (``tests/core/test_store.py``
compares the head revision with the models). A stage row is keyed by ``(job_id, epoch, stage,
component)``; ``component`` is ``''`` for the whole job's stage, which every existing row is.

SQLite cannot alter a constraint in place: ``batch_alter_table`` copies the table (its rows, its
foreign key and its index come along); PostgreSQL alters it directly. The copy reflects
``stages`` alone (``resolve_fks=False``): reflecting ``jobs`` too would warn about its
expression index, which SQLite reflection skips.
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0003_stage_component"
down_revision: str | None = "0002_accounts"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

_OLD_KEY = "uq_stages_job_id_epoch_stage"
_NEW_KEY = "uq_stages_job_id_epoch_stage_component"
_REFLECT = {"resolve_fks": False}


def upgrade() -> None:
    with op.batch_alter_table("stages", reflect_kwargs=_REFLECT) as batch:
        batch.add_column(
            sa.Column("component", sa.String(length=64), nullable=False, server_default="")
        )
        batch.drop_constraint(_OLD_KEY, type_="unique")
        batch.create_unique_constraint(_NEW_KEY, ["job_id", "epoch", "stage", "component"])


def downgrade() -> None:
    # The old key has no room for per-component rows: they go (those stages run again).
    op.execute(sa.text("DELETE FROM stages WHERE component <> ''"))
    with op.batch_alter_table("stages", reflect_kwargs=_REFLECT) as batch:
        batch.drop_constraint(_NEW_KEY, type_="unique")
        batch.create_unique_constraint(_OLD_KEY, ["job_id", "epoch", "stage"])
        batch.drop_column("component")
