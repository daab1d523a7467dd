"""The schema, as numbered migrations; a database records the ones it has had in ``schema_migrations``.

Opening a database applies the missing ones in order, each in its own transaction with its row in
``schema_migrations`` (under a lock, so that servers starting together against one PostgreSQL database apply
each once). A database that has had a migration this server does not know was written by a newer version: it
is refused rather than used with a schema the code does not expect. To add a table (as 2 added the stored
preference profiles), append a :class:`Migration` with the next number; never edit one that has shipped.
"""

from __future__ import annotations

from dataclasses import dataclass

from server.store.backend import Backend, Transaction


@dataclass(frozen=True)
class Migration:
    version: int
    name: str
    sqlite: tuple[str, ...]
    postgresql: tuple[str, ...]

    def statements(self, dialect: str) -> tuple[str, ...]:
        return self.sqlite if dialect == "sqlite" else self.postgresql


def _responses(seq: str) -> tuple[str, ...]:
    return (
        f"""CREATE TABLE responses (
            seq {seq},
            id TEXT NOT NULL UNIQUE,
            owner TEXT NOT NULL,
            created_at DOUBLE PRECISION NOT NULL,
            response TEXT NOT NULL,
            input_items TEXT NOT NULL,
            conversation TEXT NOT NULL
        )""",
        "CREATE INDEX responses_by_owner ON responses (owner, seq)",
        "CREATE INDEX responses_by_age ON responses (created_at)",
    )


def _preference_profiles(seq: str) -> tuple[str, ...]:
    return (
        f"""CREATE TABLE preference_profiles (
            seq {seq},
            id TEXT NOT NULL UNIQUE,
            owner TEXT NOT NULL,
            name TEXT NOT NULL,
            preference TEXT NOT NULL,
            created_at DOUBLE PRECISION NOT NULL,
            updated_at DOUBLE PRECISION NOT NULL,
            UNIQUE (owner, name)
        )""",
    )


MIGRATIONS: tuple[Migration, ...] = (
    Migration(
        1,
        "stored responses (POST /v1/responses): one row per response, owned by an API key's tenant ('' on an open "
        "server); seq orders them for the per-key cap",
        sqlite=_responses("INTEGER PRIMARY KEY AUTOINCREMENT"),
        postgresql=_responses("BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY"),
    ),
    Migration(
        2,
        "stored preference profiles (POST /v1/preference_profiles): one row per profile, owned by an API key's tenant "
        "('' on an open server), its name unique per owner; seq orders a listing",
        sqlite=_preference_profiles("INTEGER PRIMARY KEY AUTOINCREMENT"),
        postgresql=_preference_profiles("BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY"),
    ),
)
"""Every migration, in order (``version`` 1, 2, ...)."""

_HISTORY = """CREATE TABLE IF NOT EXISTS schema_migrations (
    version INTEGER PRIMARY KEY,
    name TEXT NOT NULL,
    applied_at DOUBLE PRECISION NOT NULL
)"""


class SchemaTooNewError(Exception):
    """The database has had migrations this server does not know (a newer version wrote it)."""


def migrate(backend: Backend, now: float, migrations: tuple[Migration, ...] = MIGRATIONS) -> list[int]:
    """Bring ``backend``'s schema up to date; the versions applied now (none when it was)."""
    with backend.transaction() as tx:
        backend.lock_schema(tx)
        tx.execute(_HISTORY)
    applied: list[int] = []
    for migration in migrations:
        with backend.transaction() as tx:
            backend.lock_schema(tx)  # one server at a time; re-read what the others applied meanwhile
            done = {row[0] for row in tx.execute("SELECT version FROM schema_migrations")}
            newest = max(done, default=0)
            if newest > migrations[-1].version:
                raise SchemaTooNewError(
                    f"the database has schema version {newest}; this server knows up to {migrations[-1].version} "
                    "(a newer version of amulet-serve wrote it)"
                )
            if migration.version in done:
                continue
            _apply(tx, backend.dialect, migration, now)
            applied.append(migration.version)
    return applied


def _apply(tx: Transaction, dialect: str, migration: Migration, now: float) -> None:
    for statement in migration.statements(dialect):
        tx.execute(statement)
    tx.execute(
        "INSERT INTO schema_migrations (version, name, applied_at) VALUES (?, ?, ?)", (migration.version, migration.name, now)
    )


def schema_version(backend: Backend) -> int:
    """The newest migration the database has had (0 for a new one)."""
    with backend.transaction() as tx:
        tx.execute(_HISTORY)
        rows = tx.execute("SELECT MAX(version) FROM schema_migrations")
    return int(rows[0][0] or 0)
