"""Plain-Python core: no Dagster imports allowed anywhere under this package.

Stages, each a package (or module) importing only the ones listed before it:

    config              settings from the environment
    db                  the embedded server, connections, applying sql/
    embed               embedders (OpenAI-compatible HTTP, local ONNX), the shared rate limit,
                        a model's native size
    targets             what is embedded and where its vectors go: vector columns and chunk sets,
                        their model, shadow and coverage vocabulary, the COPY encoding of vectors
    pipelines           a pipeline's declaration (`Pipeline`) and its facts: model spec, code
                        version, live target key, shard keys
    queue               pgmq calls, a drain's claims
    drain               claimed jobs -> current input -> provider -> vectors settled
    health              coverage, staleness, indexes, dead letters, cost estimates
    migrate             backfills and model migrations
    search              nearest rows / chunks
    api                 the Python API

The CLI, the Dagster layer (defs/, components/) and the demo sit on top.
"""
