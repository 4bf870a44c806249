"""The database: the embedded Postgres server and connections (`server`), and applying the numbered
SQL files of `sql/` to a database (`schema`, what `autoembed db init` runs).

May import: core.config. Nothing else of core imports below it."""
