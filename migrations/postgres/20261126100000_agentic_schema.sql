-- The runtime's tables move out of `public` into their own schema, `agentic`: they no longer
-- collide with an application's tables of the same name (`threads`, `checkpoints`, ...) in a
-- shared database, and a role can be granted or denied the whole store at once.
--
-- SET SCHEMA moves each table with its rows, indexes, constraints and identity sequence. The
-- migration history (`_sqlx_migrations`) stays where sqlx keeps it: the connection's schema.

CREATE SCHEMA IF NOT EXISTS agentic;

ALTER TABLE threads        SET SCHEMA agentic;
ALTER TABLE heads          SET SCHEMA agentic;
ALTER TABLE checkpoints    SET SCHEMA agentic;
ALTER TABLE channel_values SET SCHEMA agentic;
ALTER TABLE writes         SET SCHEMA agentic;
