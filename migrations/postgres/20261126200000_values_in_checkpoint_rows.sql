-- A step's commit writes one row: the channel versions it stored travel in the checkpoint row
-- itself (`channels[i]`, `bases[i]`, `data[i]`: channel, delta base, bytes; the version is the
-- row's `id`), where they took a row of `channel_values` each, with its header and index entry.
-- `channel_values` stays for versions stored before this migration, versions that outlive their
-- checkpoint row after a prune, and group commits of several threads in one statement.
--
-- `heads` goes: a namespace's head is its newest checkpoint (ids only grow within a thread),
-- read by a backward probe of the primary key. Keeping a separate head row cost every commit a
-- second table's update.

ALTER TABLE agentic.checkpoints
    ADD COLUMN channels text[],
    ADD COLUMN bases    int8[],
    ADD COLUMN data     bytea[];

DROP TABLE agentic.heads;
