"""Settings read from the environment, in one place.

Every knob has a sensible default so that `autoembed db init && autoembed drain` works with no
configuration at all (embedded Postgres, local model when no API key is set).
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path


class ConfigError(ValueError):
    """A configuration value is invalid; the message names the offending value."""


class CredentialsError(ConfigError):
    """The provider cannot be called at all with this configuration (no API key)."""


def _env_int(name: str, default: int, minimum: int = 1) -> int:
    raw = os.environ.get(name)
    if raw is None or raw == "":
        return default
    try:
        value = int(raw)
    except ValueError:
        raise ConfigError(f"{name}={raw!r} is not a whole number") from None
    if value < minimum:
        raise ConfigError(f"{name}={raw!r} must be at least {minimum}")
    return value


def _env_float(name: str, default: float, minimum: float = 0.0) -> float:
    raw = os.environ.get(name)
    if raw is None or raw == "":
        return default
    try:
        value = float(raw)
    except ValueError:
        raise ConfigError(f"{name}={raw!r} is not a number") from None
    if value < minimum:
        raise ConfigError(f"{name}={raw!r} must be at least {minimum}")
    return value


def _env_opt_int(name: str, minimum: int = 0) -> int | None:
    raw = os.environ.get(name)
    if raw is None or raw == "":
        return None
    return _env_int(name, 0, minimum)


PROVIDERS = ("openai", "local")
HOME_DIRNAME = ".autoembed"


def find_project_home(start: Path, ceiling: Path | None) -> Path | None:
    """The nearest `.autoembed` folder in `start` or a folder above it, like git finds `.git`. The
    search does not go up into `ceiling` ($HOME: a stray ~/.autoembed must not capture every project
    under it), nor past the filesystem root."""
    start = start.resolve()
    ceiling = ceiling.resolve() if ceiling is not None else None
    for folder in (start, *start.parents):
        if folder == ceiling and folder != start:
            return None
        if (folder / HOME_DIRNAME).is_dir():
            return folder / HOME_DIRNAME
    return None


def _project_home() -> tuple[Path, bool]:
    """(the embedded server's folder, whether it names an existing project): AUTOEMBED_HOME, else
    the nearest `.autoembed` from the cwd up, else the cwd's (not created by reading it)."""
    explicit = os.environ.get("AUTOEMBED_HOME")
    if explicit:
        return Path(explicit).expanduser().resolve(), True
    home = os.environ.get("HOME")
    ceiling = Path(home) if home else None
    found = find_project_home(Path.cwd(), ceiling)
    if found is not None:
        return found, True
    # None yet: the Dagster project's own (its root, wherever inside it the command runs), else the cwd's.
    project = find_dagster_project(Path.cwd(), ceiling)
    return ((project or Path.cwd()) / HOME_DIRNAME).resolve(), False


def find_dagster_project(start: Path, ceiling: Path | None) -> Path | None:
    """The nearest folder from `start` up whose pyproject.toml declares a Dagster project
    ([tool.dg.project]), not up into `ceiling`."""
    import tomllib

    start = start.resolve()
    ceiling = ceiling.resolve() if ceiling is not None else None
    for folder in (start, *start.parents):
        if folder == ceiling and folder != start:
            return None
        try:
            data = tomllib.loads((folder / "pyproject.toml").read_text())
        except (OSError, tomllib.TOMLDecodeError):
            continue
        if isinstance(data.get("tool", {}).get("dg", {}).get("project"), dict):
            return folder
    return None


def default_batch_size(provider: str) -> int:
    """Texts per embedding request by default (OpenAI takes up to 2048 inputs; the local model
    runs best in small batches)."""
    return 256 if provider == "openai" else 32


@dataclass(frozen=True)
class EmbedderSettings:
    """Which model embeds, and how to reach it. The API key is read by the client, never stored."""

    provider: str
    model: str
    dimensions: int | None = None
    base_url: str | None = None
    request_timeout: float = 60.0
    max_retries: int = 5
    batch_size: int = 256
    max_batch_tokens: int = 250_000
    max_input_tokens: int = 8191
    # The provider's limit shared by every worker (core.embed.ratelimit); None: not paced.
    requests_per_minute: int | None = None
    tokens_per_minute: int | None = None

    @classmethod
    def from_env(cls) -> "EmbedderSettings":
        provider = os.environ.get("AUTOEMBED_PROVIDER", "").strip().lower()
        if not provider:
            # Zero-config: a configured API key or base URL means OpenAI-compatible HTTP.
            has_remote = os.environ.get("OPENAI_API_KEY") or os.environ.get("OPENAI_BASE_URL")
            provider = "openai" if has_remote else "local"
        if provider not in PROVIDERS:
            raise ConfigError(f"AUTOEMBED_PROVIDER={provider!r} is not one of {', '.join(PROVIDERS)}")
        default_model = "text-embedding-3-small" if provider == "openai" else "all-MiniLM-L6-v2"
        default_batch = default_batch_size(provider)
        return cls(
            provider=provider,
            model=os.environ.get("AUTOEMBED_MODEL", "").strip() or default_model,
            dimensions=_env_opt_int("AUTOEMBED_DIMENSIONS"),
            base_url=os.environ.get("OPENAI_BASE_URL") or None,
            request_timeout=_env_float("AUTOEMBED_REQUEST_TIMEOUT", 60.0, minimum=0.1),
            max_retries=_env_int("AUTOEMBED_MAX_RETRIES", 5, minimum=0),
            batch_size=_env_int("AUTOEMBED_EMBED_BATCH", default_batch),
            max_batch_tokens=_env_int("AUTOEMBED_MAX_BATCH_TOKENS", 250_000),
            max_input_tokens=_env_int("AUTOEMBED_MAX_INPUT_TOKENS", 8191),
            requests_per_minute=_env_opt_int("AUTOEMBED_REQUESTS_PER_MINUTE", minimum=1),
            tokens_per_minute=_env_opt_int("AUTOEMBED_TOKENS_PER_MINUTE", minimum=1),
        )


@dataclass(frozen=True)
class Settings:
    """Database location and drain behaviour."""

    database_url: str | None = None
    home: Path = field(default_factory=lambda: Path(HOME_DIRNAME))
    # False when `home` is only the cwd's `.autoembed` because no project was found (see
    # database.require_project: commands that need data do not start an empty server there).
    home_found: bool = True
    queue: str = "embedding_jobs"
    read_batch: int = 500
    visibility_timeout: int = 120
    max_attempts: int = 5
    retry_delay: int = 10

    @classmethod
    def from_env(cls) -> "Settings":
        home, found = _project_home()
        return cls(
            database_url=os.environ.get("AUTOEMBED_DATABASE_URL") or None,
            home=home,
            home_found=found,
            queue=os.environ.get("AUTOEMBED_QUEUE", "embedding_jobs"),
            read_batch=_env_int("AUTOEMBED_READ_BATCH", 500),
            visibility_timeout=_env_int("AUTOEMBED_VISIBILITY_TIMEOUT", 120),
            max_attempts=_env_int("AUTOEMBED_MAX_ATTEMPTS", 5),
            retry_delay=_env_int("AUTOEMBED_RETRY_DELAY", 10, minimum=0),
        )


# Default drains per queue: a second drain overlaps its provider calls and HNSW index inserts with
# the first one's (an indexed table takes ~2x with 2 writers), while the two cores of one machine
# leave nothing for a third. Past one machine (README: Deploy to Kubernetes), raise it.
DEFAULT_MAX_DRAINS = 2


@dataclass(frozen=True)
class ScalingSettings:
    """How many drain runs a queue's sensor asks for (core.drain.scaling.desired_drains)."""

    max_drains: int = DEFAULT_MAX_DRAINS
    rows_per_drain: int = 5000  # claimable backlog one drain is expected to handle
    min_age_seconds: float = 10.0  # a backlog younger than this needs no extra drain yet

    @classmethod
    def from_env(cls) -> "ScalingSettings":
        return cls(
            max_drains=_env_int("AUTOEMBED_MAX_DRAINS", DEFAULT_MAX_DRAINS),
            rows_per_drain=_env_int("AUTOEMBED_ROWS_PER_DRAIN", 5000),
            min_age_seconds=_env_float("AUTOEMBED_SCALE_MIN_AGE", 10.0),
        )
