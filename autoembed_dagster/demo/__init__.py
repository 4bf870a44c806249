"""The demo (`autoembed demo`): the corpus of Python standard-library documentation (`corpus`) and
the runner that creates the demo's tables, enrols them, drains and searches (`runner`).

Imported only by the `demo` subcommand of the CLI (lazily) and by tests and benchmarks; nothing in
core/ or defs/ imports it. May import anything of the package."""
