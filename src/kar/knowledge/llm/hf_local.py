"""A local transformers causal LM as the knowledge source (``llm=hf``): no API, no key, no cost.

Prompts are wrapped in the tokenizer's chat template (one user message; plain text, with a
warning, when the tokenizer has none), left-padded into batches of similar length and decoded
greedily by default. Each batch's answers are committed to the store as soon as it is done, so an
interrupted run resumes with the next batch. The model is loaded only when prompts need it, on
the device accelerate would pick (``llm.device`` overrides).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator, Sequence
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from pathlib import Path
from typing import Any

import torch
import transformers
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    AutoTokenizer,
    GenerationConfig,
    PreTrainedTokenizerBase,
)

from kar.knowledge.encoder import default_device, weights_fingerprint
from kar.knowledge.llm.base import Knowledge, LLMProvider
from kar.knowledge.llm.generation import (
    Completion,
    GenerationReport,
    GenerationSettings,
    Outcome,
    Pricing,
    RunControl,
    Sender,
    run_generation,
)
from kar.knowledge.prompts import PromptRequest
from kar.knowledge.store import FailureRecord, KnowledgeStore
from kar.registry import LLMS, ConfigError

log = logging.getLogger("kar.knowledge")

DTYPES = {"auto": "auto", "float32": torch.float32, "bfloat16": torch.bfloat16}
DTYPES["float16"] = torch.float16
# transformers 4.56 renamed from_pretrained's torch_dtype to dtype.
_VERSION = tuple(int(part) for part in transformers.__version__.split(".")[:2])
_DTYPE_ARG = "dtype" if _VERSION >= (4, 56) else "torch_dtype"


@LLMS.register("hf")
class HFCausalLM(LLMProvider):
    """Answers from a transformers causal LM given by a local folder or a Hub id (``model``)."""

    def __init__(
        self,
        *,
        model: str = "Qwen/Qwen2.5-0.5B-Instruct",
        revision: str | None = None,
        max_new_tokens: int = 512,
        batch_size: int = 8,
        do_sample: bool = False,
        temperature: float = 1.0,
        top_p: float = 1.0,
        dtype: str = "auto",
        device: str | None = None,
        price_per_1m_input_tokens: float = 0.0,
        price_per_1m_output_tokens: float = 0.0,
        expected_output_tokens: int | None = None,
        max_cost_usd: float | None = None,
        dry_run: bool = False,
        retry_failed: bool = False,
    ) -> None:
        if not model:
            raise ConfigError("llm.model is empty; give a model folder or a Hugging Face Hub id")
        if max_new_tokens < 1:
            raise ConfigError(f"llm.max_new_tokens={max_new_tokens}; it must be >= 1")
        if dtype not in DTYPES:
            raise ConfigError(f"llm.dtype={dtype!r} is not one of {', '.join(DTYPES)}")
        if do_sample and (temperature <= 0 or not 0 < top_p <= 1):
            raise ConfigError(
                f"llm.temperature={temperature} / llm.top_p={top_p}: sampling needs "
                "temperature > 0 and 0 < top_p <= 1 (or llm.do_sample=false for greedy)"
            )
        self.model = model
        self.revision = revision
        self.max_new_tokens = max_new_tokens
        self.do_sample = do_sample
        self.temperature = temperature
        self.top_p = top_p
        self.dtype = dtype
        self.device = device
        self.settings = GenerationSettings(
            pricing=Pricing(price_per_1m_input_tokens, price_per_1m_output_tokens),
            max_output_tokens=max_new_tokens,
            expected_output_tokens=expected_output_tokens,
            max_cost_usd=max_cost_usd,
            dry_run=dry_run,
            retry_failed=retry_failed,
            batch_size=batch_size,
        )
        self.last_report = None
        self._key = self._make_key()

    def _make_key(self) -> str:
        decoding = f"sample(t={self.temperature},p={self.top_p})" if self.do_sample else "greedy"
        source = self.model
        folder = Path(self.model).expanduser()
        if folder.is_dir():
            # A folder's weights can change under the same path: identify what it holds.
            config = AutoConfig.from_pretrained(str(folder))
            source = f"{folder.name}@{weights_fingerprint(str(folder), config)}"
        elif self.revision:
            source = f"{self.model}@{self.revision}"
        return f"hf:{source}:{self.dtype}:{decoding}:max_new={self.max_new_tokens}"

    @property
    def key(self) -> str:
        """Model (folder fingerprint or Hub id and revision), dtype and decoding parameters."""
        return self._key

    def prefix_lengths(self) -> dict[str, int] | None:
        return None

    def generate(
        self, requests: Sequence[PromptRequest], store: KnowledgeStore
    ) -> dict[tuple[str, str], Knowledge]:
        # Similar lengths share a batch: less padding computed for nothing.
        by_length = sorted(requests, key=lambda r: len(r.prompt))
        self.last_report = GenerationReport(llm_key=self.key)
        knowledge = run_generation(
            by_length,
            store,
            llm_key=self.key,
            settings=self.settings,
            open_sender=self._open_sender,
            label=Path(self.model).name,
            report=self.last_report,
        )
        return knowledge

    def _open_sender(self, n_prompts: int) -> AbstractAsyncContextManager[Sender]:
        tokenizer, model = self._load()
        device = torch.device(self.device) if self.device else default_device()
        log.info(
            "%s: %d prompts on %s, batches of %d",
            self.key, n_prompts, device, self.settings.batch_size,
        )  # fmt: skip
        return _open_local_sender(self, tokenizer, model.to(device).eval(), device)

    def _load(self) -> tuple[PreTrainedTokenizerBase, Any]:
        folder = Path(self.model).expanduser()
        source = str(folder) if folder.is_dir() else self.model
        try:
            tokenizer = AutoTokenizer.from_pretrained(source, revision=self.revision)
            model = AutoModelForCausalLM.from_pretrained(
                source, revision=self.revision, **{_DTYPE_ARG: DTYPES[self.dtype]}
            )
        except OSError as err:
            first_line = str(err).strip().splitlines()[0] if str(err).strip() else repr(err)
            raise ConfigError(
                f"cannot load llm.model={self.model!r} ({first_line}). Fix: point llm.model at a "
                f"local folder with config.json, the weights and the tokenizer files, or at a "
                f"Hugging Face Hub id with the download allowed (unset HF_HUB_OFFLINE) or already "
                f"in the cache (HF_HOME)"
            ) from err
        tokenizer.padding_side = "left"  # generation continues from the last real token
        if tokenizer.pad_token is None:
            tokenizer.pad_token = tokenizer.eos_token or tokenizer.unk_token
        if tokenizer.pad_token is None:
            raise ConfigError(
                f"the tokenizer of llm.model={self.model!r} has no pad, eos or unk token to pad "
                "batches with; use a model whose tokenizer defines one, or llm.batch_size=1"
            )
        if not getattr(tokenizer, "chat_template", None):
            log.warning(
                "%s: the tokenizer has no chat template: prompts are given as plain text, which "
                "base (non-chat) models continue rather than answer",
                self.key,
            )
        return tokenizer, model


@asynccontextmanager
async def _open_local_sender(
    provider: HFCausalLM, tokenizer: PreTrainedTokenizerBase, model: Any, device: torch.device
) -> AsyncIterator[Sender]:
    try:
        yield _LocalSender(provider, tokenizer, model, device)
    finally:
        del model
        if device.type == "cuda":
            torch.cuda.empty_cache()


class _LocalSender:
    """Generates a batch at a time, off the event loop so that the writer commits meanwhile."""

    def __init__(
        self,
        provider: HFCausalLM,
        tokenizer: PreTrainedTokenizerBase,
        model: Any,
        device: torch.device,
    ) -> None:
        self.p = provider
        self.tokenizer = tokenizer
        self.model = model
        self.device = device
        self.templated = bool(getattr(tokenizer, "chat_template", None))
        eos = model.generation_config.eos_token_id
        if eos is None:
            eos = tokenizer.eos_token_id
        self.eos_ids = set(eos if isinstance(eos, list) else [] if eos is None else [eos])
        sampling = {"temperature": provider.temperature, "top_p": provider.top_p}
        self.generation_config = GenerationConfig(
            max_new_tokens=provider.max_new_tokens,
            do_sample=provider.do_sample,
            num_beams=1,
            pad_token_id=tokenizer.pad_token_id,
            eos_token_id=eos,
            **(sampling if provider.do_sample else {}),
        )
        limits = [getattr(model.config, "max_position_embeddings", None)]
        limits.append(tokenizer.model_max_length)
        known = [n for n in limits if isinstance(n, int) and 0 < n < 1_000_000]
        self.context = min(known) if known else None

    async def send(self, prompts: list[str], run: RunControl) -> list[Outcome]:
        run.note_request()
        return await asyncio.to_thread(self._generate, prompts)

    def _text(self, prompt: str) -> str:
        if not self.templated:
            return prompt
        messages = [{"role": "user", "content": prompt}]
        return self.tokenizer.apply_chat_template(
            messages, tokenize=False, add_generation_prompt=True
        )

    def _generate(self, prompts: list[str]) -> list[Outcome]:
        texts = [self._text(p) for p in prompts]
        # A chat template writes its own special tokens.
        special = not self.templated
        lengths = [len(self.tokenizer(t, add_special_tokens=special)["input_ids"]) for t in texts]
        outcomes: list[Outcome] = []
        fitting = []
        for prompt, text, n in zip(prompts, texts, lengths, strict=True):
            if self.context is not None and n + self.p.max_new_tokens > self.context:
                message = (
                    f"context too long: {n} prompt tokens + llm.max_new_tokens="
                    f"{self.p.max_new_tokens} exceed the model's {self.context}"
                )
                outcomes.append(FailureRecord(prompt, "rejected", message, attempts=1))
            else:
                fitting.append((prompt, text))
        if not fitting:
            return outcomes
        batch = self.tokenizer(
            [text for _, text in fitting],
            return_tensors="pt",
            padding=True,
            add_special_tokens=special,
            return_token_type_ids=False,  # BERT-style tokenizers add them; causal LMs refuse them
        ).to(self.device)
        started = time.perf_counter()
        with torch.inference_mode():
            output = self.model.generate(**batch, generation_config=self.generation_config)
        latency_s = time.perf_counter() - started
        new_tokens = output[:, batch["input_ids"].shape[1] :].tolist()  # (B, <= max_new_tokens)
        prompt_tokens = batch["attention_mask"].sum(dim=1).tolist()  # (B,)
        for (prompt, _), tokens, n_prompt in zip(fitting, new_tokens, prompt_tokens, strict=True):
            end = next((i + 1 for i, t in enumerate(tokens) if t in self.eos_ids), len(tokens))
            answer = self.tokenizer.decode(tokens[:end], skip_special_tokens=True).strip()
            if not answer:
                outcomes.append(FailureRecord(prompt, "rejected", "empty answer", attempts=1))
                continue
            outcomes.append(
                Completion(
                    prompt=prompt,
                    answer=answer,
                    prompt_tokens=int(n_prompt),
                    completion_tokens=end,
                    latency_s=latency_s,
                    meta={"batch_size": len(fitting), "device": str(self.device)},
                )
            )
        return outcomes
