"""The one interface every embedding provider implements."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol, Sequence

import numpy as np

# What is known of OpenAI's models without their client (here, not in openai_embedder: a
# declaration is checked with it when the code location loads, which must not import openai).
# Output sizes of OpenAI's models when no `dimensions` is requested.
KNOWN_DIMENSIONS = {
    "text-embedding-3-small": 1536,
    "text-embedding-3-large": 3072,
    "text-embedding-ada-002": 1536,
}


def supports_dimensions(model: str) -> bool:
    """Only text-embedding-3 and later accept `dimensions`; older models reject it with 400."""
    return model.startswith("text-embedding-3")


@dataclass(frozen=True)
class ModelIdentity:
    """What produced a vector. Two vectors are comparable only if their identities are equal."""

    provider: str
    model: str
    dimensions: int

    @property
    def key(self) -> str:
        return f"{self.provider}:{self.model}:{self.dimensions}"


class EmbeddingError(Exception):
    """The provider could not embed. `retryable` says whether trying again later may succeed;
    `configuration` that no input can succeed until the configuration is fixed (a rejected API
    key, an unknown model): the drain then stops and leaves every job queued."""

    def __init__(self, message: str, retryable: bool = True, configuration: bool = False):
        super().__init__(message)
        self.retryable = retryable and not configuration
        self.configuration = configuration


@dataclass
class EmbedOutcome:
    """Result of embedding a list of texts, aligned with the input order.

    For each input exactly one of `vectors[i]` (float32 array of `identity.dimensions`) and
    `errors[i]` (an EmbeddingError) is set, so one bad input never fails its neighbours.
    """

    vectors: list[np.ndarray | None]
    errors: list[EmbeddingError | None]
    tokens: int = 0
    requests: int = 0
    truncated: int = 0
    limit_wait_seconds: float = 0.0  # time spent waiting for the shared provider rate limit

    @property
    def failed_indexes(self) -> list[int]:
        return [i for i, e in enumerate(self.errors) if e is not None]

    @property
    def refusal(self) -> "EmbeddingError | None":
        """The first error that every request would get until the configuration is fixed."""
        return next((e for e in self.errors if e is not None and e.configuration), None)


class ProviderConfigError(RuntimeError):
    """The provider refuses every request until its configuration is fixed (401/403, unknown
    model): a drain or re-embed stops with this error and writes nothing of the refused batch."""


class Embedder(Protocol):
    identity: ModelIdentity

    def embed(self, texts: Sequence[str]) -> EmbedOutcome:
        """Embed non-empty texts. Never raises for a single bad input; see EmbedOutcome."""
        ...

    def count_tokens(self, text: str) -> int: ...
