"""private notes, protected by row-level security

Revision ID: 7c1f3e2a9b10
Revises: 0d2a01074648
Create Date: 2026-12-03 11:00:00

"""

import sqlalchemy as sa
from alembic import op

# revision identifiers, used by Alembic.
revision = "7c1f3e2a9b10"
down_revision = "0d2a01074648"
branch_labels = None
depends_on = None

# The transaction's user: NULL (or '' once set in this server session) when none, so the
# policy denies. The role /me requests run as (SET LOCAL ROLE): neither the table's owner nor a
# superuser, who would bypass the policy; roles belong to the whole server, so it is made once
# and kept by the downgrade.
USER = sa.text("nullif(current_setting('app.user_id', true), '')")
STATEMENTS = [
    "ALTER TABLE private_notes ENABLE ROW LEVEL SECURITY",
    "CREATE POLICY own_notes ON private_notes"
    " USING (owner = nullif(current_setting('app.user_id', true), ''))"
    " WITH CHECK (owner = nullif(current_setting('app.user_id', true), ''))",
    "DO $$ BEGIN IF NOT EXISTS (SELECT FROM pg_roles WHERE rolname = 'example_notes_user')"
    " THEN CREATE ROLE example_notes_user NOLOGIN; END IF; END $$",
    "GRANT example_notes_user TO CURRENT_USER",
    "GRANT SELECT, INSERT ON private_notes TO example_notes_user",
    "GRANT USAGE ON SEQUENCE private_notes_id_seq TO example_notes_user",
]


def upgrade() -> None:
    op.create_table(
        "private_notes",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("owner", sa.Text(), server_default=USER, nullable=False),
        sa.Column("body", sa.Text(), nullable=False),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_private_notes")),
    )
    for statement in STATEMENTS:
        op.execute(statement)


def downgrade() -> None:
    op.drop_table("private_notes")
