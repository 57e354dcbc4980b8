-- Checkpoint store, PostgreSQL.
--
-- A thread's rows are keyed by `tid`, a bigint given to the thread when it is created: the
-- thread id (often a 36-character UUID) is stored once instead of in every row and index entry.
-- A `tid` is never reused, so rows left by a thread deleted under a running commit can never
-- be read as another thread's.
--
-- Fixed-width columns come first in each table so rows carry no alignment padding.

CREATE TABLE threads (
    tid        bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    epoch      bigint      NOT NULL DEFAULT 0,
    created_at timestamptz NOT NULL DEFAULT now(),
    updated_at timestamptz NOT NULL DEFAULT now(),
    thread_id  text        NOT NULL UNIQUE,
    graph_name text        NOT NULL,
    graph_hash text        NOT NULL,
    owner      text
);

-- The head of each namespace. Updated by every commit: the free space left by the fill factor
-- lets those updates stay on the page (HOT) instead of growing the table and its index.
CREATE TABLE heads (
    tid  bigint NOT NULL,
    head bigint NOT NULL,
    ns   text   NOT NULL,
    PRIMARY KEY (tid, ns)
) WITH (fillfactor = 50);

-- One row per checkpoint. `body` is the serde_json encoding of CheckpointBody, read and written
-- as bytes; only `metadata` is jsonb, for queries from outside the runtime.
CREATE TABLE checkpoints (
    tid        bigint      NOT NULL,
    id         bigint      NOT NULL,
    parent     bigint,
    step       bigint      NOT NULL,
    created_at timestamptz NOT NULL DEFAULT now(),
    ns         text        NOT NULL,
    source     text        NOT NULL,
    body       bytea       NOT NULL,
    metadata   jsonb       NOT NULL,
    PRIMARY KEY (tid, ns, id)
);

-- One row per stored channel version: a whole value, or (base not null) the items appended
-- since version `base`.
CREATE TABLE channel_values (
    tid     bigint NOT NULL,
    version bigint NOT NULL,
    base    bigint,
    ns      text   NOT NULL,
    channel text   NOT NULL,
    data    bytea  NOT NULL,
    PRIMARY KEY (tid, ns, channel, version)
);

-- Pending writes of the current step of a namespace; deleted when the next checkpoint folds
-- them in. `seq` keeps them in the order they were recorded.
CREATE TABLE writes (
    tid        bigint NOT NULL,
    checkpoint bigint NOT NULL,
    seq        bigint GENERATED ALWAYS AS IDENTITY,
    ns         text   NOT NULL,
    task       text   NOT NULL,
    kind       text   NOT NULL,
    key        text   NOT NULL,
    data       bytea  NOT NULL,
    PRIMARY KEY (tid, ns, checkpoint, task, kind, key)
);
