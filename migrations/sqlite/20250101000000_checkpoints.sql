-- Checkpoint store, SQLite: the same tables as PostgreSQL.
--
-- A thread's rows are keyed by `tid`, an integer given to the thread when it is created
-- (AUTOINCREMENT: never reused), so the thread id is stored once. Tables keyed by a composite
-- key are WITHOUT ROWID: the key is stored once, in the table's own b-tree.
-- Times are Unix microseconds.

CREATE TABLE threads (
    tid        INTEGER PRIMARY KEY AUTOINCREMENT,
    thread_id  TEXT    NOT NULL UNIQUE,
    graph_name TEXT    NOT NULL,
    graph_hash TEXT    NOT NULL,
    owner      TEXT,
    -- The live lease holder, `host:pid:process-start:nonce`; NULL when released.
    holder     TEXT,
    epoch      INTEGER NOT NULL DEFAULT 0,
    created_at INTEGER NOT NULL,
    updated_at INTEGER NOT NULL
);

CREATE TABLE heads (
    tid  INTEGER NOT NULL,
    ns   TEXT    NOT NULL,
    head INTEGER NOT NULL,
    PRIMARY KEY (tid, ns)
) WITHOUT ROWID;

-- `body` is the serde_json encoding of CheckpointBody; `metadata` is JSON text.
CREATE TABLE checkpoints (
    tid        INTEGER NOT NULL,
    ns         TEXT    NOT NULL,
    id         INTEGER NOT NULL,
    parent     INTEGER,
    step       INTEGER NOT NULL,
    source     TEXT    NOT NULL,
    body       BLOB    NOT NULL,
    metadata   TEXT    NOT NULL,
    created_at INTEGER NOT NULL,
    PRIMARY KEY (tid, ns, id)
) WITHOUT ROWID;

CREATE TABLE channel_values (
    tid     INTEGER NOT NULL,
    ns      TEXT    NOT NULL,
    channel TEXT    NOT NULL,
    version INTEGER NOT NULL,
    base    INTEGER,
    data    BLOB    NOT NULL,
    PRIMARY KEY (tid, ns, channel, version)
) WITHOUT ROWID;

-- A rowid table: the rowid keeps pending writes in the order they were recorded.
CREATE TABLE writes (
    tid        INTEGER NOT NULL,
    ns         TEXT    NOT NULL,
    checkpoint INTEGER NOT NULL,
    task       TEXT    NOT NULL,
    kind       TEXT    NOT NULL,
    key        TEXT    NOT NULL,
    data       BLOB    NOT NULL,
    PRIMARY KEY (tid, ns, checkpoint, task, kind, key)
);
