"""Plain-Python core: no Dagster imports allowed anywhere under this package.

Stages, each a package (or module) importing only the ones listed before it:

    config, pipelines   settings from the environment; a pipeline's declaration (`Pipeline`)
    db                  the embedded server, connections, applying sql/
    embed               embedders (OpenAI-compatible HTTP, local ONNX), the shared rate limit
    targets             what is embedded and where its vectors go: vector columns and chunk sets,
                        their model, shadow and coverage vocabulary, the COPY encoding of vectors
    queue               pgmq calls, a drain's claims
    drain               claimed jobs -> current input -> provider -> vectors settled
    health              coverage, staleness, indexes, dead letters, cost estimates
    migrate             backfills and model migrations
    search              nearest rows / chunks
    api                 the Python API

The CLI, the Dagster layer (defs/, components/) and the demo sit on top.
"""
