"""Embedding targets: what is embedded and where its vectors go. `catalog` validates a target
(table, key, content function, vector column) against the catalog and the registry; `shapes` is
the interface over a target's shape (`Shape`: a vector column, a chunk set) for what reads a
target whole: its one coverage / staleness / bad-row count, its nearest neighbours, where its
vectors are (core.health, core.search and core.migrate are written once against it), and a
target's model change (`ModelChange`: the steps that make, promote, roll back and drop its
shadow, which core.migrate.migration's one flow runs); `chunks` is
the chunk-set target (a parent table's chunk table: plan, write, coverage, shadow, promotion);
`splitter` cuts documents into chunks by the model's own tokenizer; `models` says which model a
target's vectors are of (model spec, the model migration in flight, the migration-aware
resolver); `shadow` names and indexes shadow / retired copies (and `Coverage`), and holds a
vector column's migration steps (renames, trigger and index swaps); `vectors` encodes vectors for
COPY in the target's own type; `writes` is the one write of vectors into a target
(`TargetWrite`: a vector column's, a chunk set's), under the stale-write guard and through the
owner's write function, shared by the drain's settle and the backfill's pages; `badrows` makes
one bad row fail alone (vector checks, write / read / scan isolation) for both shapes.

May import: core.config, core.db, core.embed."""
