"""The server's database: stored responses (``POST /v1/responses`` with ``store``), preference profiles, and
anything else a caller keeps on the server (one more numbered migration each).

* :mod:`server.store.config`: :class:`StoreConfig`, where the database is and how long responses are kept;
* :mod:`server.store.options`: its ``amulet-server`` options (``--data-dir``, ``--database-url``, ``--response-ttl``,
  ``--max-stored-responses``);
* :mod:`server.store.database`: :class:`Database`, one connection on a thread of its own (every call off the event
  loop), transactions, and the schema brought up to date on opening (:mod:`server.store.migrations`);
* :mod:`server.store.sqlite` and :mod:`server.store.postgres`: the two backends (stdlib ``sqlite3`` in WAL mode; psycopg 3);
* :mod:`server.store.responses`: :class:`ResponseStore`, the stored responses, each owned by the API key
  (tenant) that made it;
* :mod:`server.store.profiles`: :class:`ProfileStore`, the stored preference profiles, owned the same way.
"""
