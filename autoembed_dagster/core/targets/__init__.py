"""Embedding targets: what is embedded and where its vectors go. `catalog` validates a target
(table, key, content function, vector column) against the catalog and the registry; `chunks` is
the chunk-set target (a parent table's chunk table: plan, write, coverage, shadow, promotion);
`splitter` cuts documents into chunks by the model's own tokenizer.

May import: core.config, core.db, core.embed. (Today `chunks` still reaches up into
core.drain.embed for the COPY framing and core.migrate.migration for coverage and index helpers.)"""
