"""``SpanctxBackend``: Mellea's ``LocalHFBackend`` with every model call run by spanctx.

What changes against ``LocalHFBackend`` (the rest, Mellea's option merging, output
parsing, tool-call parsing, thinking split, intrinsic rewriting and result processing,
is Mellea's own, inherited):

- chat / instruct / react calls: the conversation is ``Context.chat`` (one span per
  message, see ``prompts.py``), so each turn reuses every earlier turn's KV and computes
  only the new tokens; ``CBlock(cache=True)`` blocks get spans of their own; ``format=``
  is enforced by spanctx's JSON grammar mask; streaming, tools, ``SEED``, ``LOGITS`` and
  ``RAW_LOGITS`` as Mellea defines them;
- ``generate_from_raw``: one ``generate_batch`` (left-padded, each row exact), or one
  call per prompt when a row needs a grammar mask, scores or stop strings;
- adapters: ``load_peft_adapter`` / ``unload_peft_adapter`` load into spanctx
  (``Runtime.add_adapter``), where adapters are switched per call, so
  ``activate_peft_adapter`` / ``deactivate_peft_adapter`` have nothing to do. An aLoRA
  runs from the LAST occurrence of its invocation in the prompt Mellea renders
  (``alora_start="in_prompt"``), on the base model's reused cache of everything before
  it, with PEFT's ``alora_offsets`` (Mellea's stock path never passes them: its aLoRA
  calls run on base weights).

Token usage: ``mot.generation.usage`` gets OpenAI's ``prompt_tokens_details.cached_tokens``
(prompt tokens read from spanctx's store); ``token_counts()`` sums every call's.
"""

from __future__ import annotations

import asyncio
import datetime
import functools
import threading
from collections.abc import Sequence
from typing import Any

import attrs
import torch
from mellea.backends import ModelOption
from mellea.backends.adapters import EmbeddedIntrinsicAdapter
from mellea.backends.huggingface import HFAloraCacheInfo, LocalHFBackend
from mellea.backends.tools import (
    add_tools_from_context_actions,
    add_tools_from_model_options,
    convert_tools_to_json,
)
from mellea.backends.utils import to_chat
from mellea.core import (
    Component,
    GenerateLog,
    GenerateType,
    MelleaLogger,
    ModelOutputThunk,
)
from mellea.helpers import DEFAULT_CHUNK_TIMEOUT, send_to_queue
from transformers import StoppingCriteria, StoppingCriteriaList
from transformers.generation.streamers import AsyncTextIteratorStreamer
from transformers.generation.utils import GenerateDecoderOnlyOutput

from ...cache.store import KVStore
from ...core.spans import Context
from ...features.structured import GrammarMask, JsonFormat, eos_ids, json_matcher
from ...runtime import Runtime
from ...session.results import GenerationStats
from .prompts import (
    PromptMemory,
    cached_block_values,
    conversation_context,
    refuse_multimodal,
)
from .requests import GenerateRequest, hf_output

__all__ = ["SpanctxBackend", "TokenCounts"]


@attrs.frozen
class TokenCounts:
    """Prompt and new tokens of a backend's model calls so far (spanctx calls only)."""

    calls: int = 0
    prompt_tokens: int = 0
    cached_tokens: int = 0  # read from the store
    computed_tokens: int = 0  # run through the model
    new_tokens: int = 0

    def plus(self, stats: GenerationStats) -> TokenCounts:
        return TokenCounts(self.calls + 1, self.prompt_tokens + stats.prompt_tokens,
                           self.cached_tokens + stats.cached_tokens, self.computed_tokens + stats.computed_tokens,
                           self.new_tokens + stats.new_tokens)


@attrs.define
class _CallRecord:
    """Filled by a chat call's worker thread, read by its output processing."""

    input_ids: torch.Tensor | None = None  # [1, S]
    stats: GenerationStats | None = None


class _StopWhenSet(StoppingCriteria):
    """Stops generation once ``event`` is set (Mellea's cooperative cancel of a stream)."""

    def __init__(self, event: threading.Event) -> None:
        self.event = event

    def __call__(self, input_ids, scores, **kwargs) -> bool:
        return self.event.is_set()


class _AdapterModel:
    """What Mellea's intrinsic code calls ``model``: ``generate`` runs through spanctx with
    adapter ``adapter``; other attributes are the model's."""

    def __init__(self, backend: SpanctxBackend, adapter: str, model) -> None:
        self._backend = backend
        self._adapter = adapter
        self._model = model

    def generate(self, input_ids: torch.Tensor, **kwargs):
        return self._backend._generate_ids(input_ids, self._adapter, kwargs)

    def __getattr__(self, name: str):
        return getattr(self._model, name)


class SpanctxBackend(LocalHFBackend):
    """Mellea's Hugging Face backend on spanctx. Construct it like ``LocalHFBackend``.

    ``store_bytes`` bounds spanctx's KV store (default: half the free GPU memory, or a
    quarter of the free RAM on CPU); ``store`` shares one store between backends;
    ``remembered_prompts`` is how many recent chat prompts lend their spans to prompts
    that arrive as token ids (intrinsics). The spanctx runtime is ``backend.runtime``.
    """

    def __init__(self, model_id, formatter=None, *, use_caches: bool = True, cache=None, custom_config=None,
                 default_to_constraint_checking_alora: bool = True, load_embedded_adapters: bool = False,
                 adapter_source: str | None = None, model_options: dict | None = None,
                 store_bytes: int | None = None, store: KVStore | None = None, remembered_prompts: int = 32) -> None:
        super().__init__(model_id, formatter, use_caches=use_caches, cache=cache, custom_config=custom_config,
                         default_to_constraint_checking_alora=default_to_constraint_checking_alora,
                         load_embedded_adapters=load_embedded_adapters, adapter_source=adapter_source,
                         model_options=model_options)
        self._runtime = Runtime(self._model, self._tokenizer, store_bytes, store=store)
        self._prompts = PromptMemory(self._runtime, remembered_prompts)
        self._counts = TokenCounts()
        self._counts_lock = threading.Lock()

    @property
    def runtime(self) -> Runtime:
        """The spanctx runtime that runs this backend's model calls."""
        return self._runtime

    def token_counts(self) -> TokenCounts:
        """Prompt and new tokens of every model call so far."""
        with self._counts_lock:
            return self._counts

    # -- chat, instruct, react -----------------------------------------------------------

    async def _generate_from_context_standard(self, action, ctx, *, _format=None, model_options: dict[str, Any],
                                              tool_calls: bool = False) -> ModelOutputThunk:
        if not ctx.is_chat_context:
            raise ValueError("Does not yet support non-chat contexts.")  # Mellea's wording
        refuse_multimodal(action, ctx)
        conversation = to_chat(action, ctx, self.formatter, model_options.get(ModelOption.SYSTEM_PROMPT))
        tools = self._tools_for_call(action, ctx, model_options, tool_calls, _format)
        prompt = conversation_context(
            self._runtime, conversation, tools=convert_tools_to_json(tools),
            template_kwargs=self._filter_for_chat_template(model_options),
            cached_blocks=cached_block_values([*(ctx.view_for_generation() or []), action]))
        request = GenerateRequest.of(self._make_backend_specific_and_remove(model_options), model_options,
                                     self._tokenizer)
        record = _CallRecord()
        streamer = cancel = None
        if model_options.get(ModelOption.STREAM, False):
            streamer = AsyncTextIteratorStreamer(self._tokenizer, skip_prompt=True, skip_special_tokens=True)
            cancel = threading.Event()
            request = attrs.evolve(request, kwargs=_with_cancel(request.kwargs, cancel))
        work = asyncio.to_thread(self._run_chat, prompt, request, record, _format, streamer)

        output = ModelOutputThunk(None)
        if cancel is not None:
            output._gen.cancel_hook = cancel.set
        output._gen.start = datetime.datetime.now()
        output._call.context = ctx.view_for_generation()
        output._call.action = action
        output._call.model_options = model_options
        output._gen.process = functools.partial(self._process, record=record)
        output._gen.post_process = functools.partial(
            self._post_process, record=record, conversation=conversation, _format=_format, tool_calls=tool_calls,
            tools=tools, seed=model_options.get(ModelOption.SEED))
        output.generation.model = self._model_id
        output.generation.provider = self._provider
        response = work
        if streamer is not None:
            output._gen.generate_extra = asyncio.create_task(work)
            response = streamer
        output._gen.generate = asyncio.create_task(send_to_queue(
            response, output, chunk_timeout=model_options.get(ModelOption.STREAM_TIMEOUT, DEFAULT_CHUNK_TIMEOUT),
            on_timeout=output._gen.cancel_hook))
        output._gen.generate_type = GenerateType.ASYNC
        return output

    async def _generate_from_context_with_kv_cache(self, action, ctx, *, _format=None, model_options,
                                                   tool_calls: bool = False) -> ModelOutputThunk:
        """Mellea's KV-block path: spanctx's chat path already keeps every block's KV."""
        return await self._generate_from_context_standard(action, ctx, _format=_format, model_options=model_options,
                                                          tool_calls=tool_calls)

    def _tools_for_call(self, action, ctx, model_options, tool_calls: bool, _format) -> dict:
        tools: dict = {}
        if not tool_calls:
            return tools
        if _format:
            MelleaLogger.get_logger().warning(
                "tool calling is superseded by format=: the tools are not offered for this request")
            return tools
        add_tools_from_model_options(tools, model_options)
        add_tools_from_context_actions(tools, ctx.actions_for_available_tools())
        add_tools_from_context_actions(tools, [action])  # the action's own tools win name clashes
        return tools

    def _run_chat(self, prompt: Context, request: GenerateRequest, record: _CallRecord, _format,
                  streamer: AsyncTextIteratorStreamer | None):
        """Worker thread: one chat call through spanctx."""
        try:
            with self._generation_lock:
                ids = self._runtime.token_ids(prompt)
                record.input_ids = torch.tensor([ids], dtype=torch.long, device=self._device)
                self._prompts.remember(ids, prompt)
                kwargs = dict(request.kwargs)
                if _format is not None:
                    mask = GrammarMask(json_matcher(self._runtime, JsonFormat.of(_format).schema),
                                       eos_ids(self._runtime))
                    kwargs["logits_processor"] = [*kwargs.get("logits_processor", []), mask]
                result = self._runtime.generate(
                    prompt, request.new_tokens(len(ids), self._model.generation_config, self._runtime.max_positions),
                    output_scores=request.output_scores, output_logits=request.output_logits, streamer=streamer,
                    **kwargs)
                record.stats = result.stats
                self._count(result.stats)
                return hf_output(ids, result, self._device)
        except BaseException:
            if streamer is not None:
                streamer.end()  # the consumer stops waiting; the error surfaces from generate_extra
            raise

    async def _process(self, mot: ModelOutputThunk, chunk, *, record: _CallRecord) -> None:
        await self.processing(mot, chunk, input_ids=record.input_ids)

    async def _post_process(self, mot: ModelOutputThunk, *, record: _CallRecord, conversation, _format, tool_calls,
                            tools, seed) -> None:
        output = mot.raw.response
        await self.post_processing(mot, conversation, _format, tool_calls, tools, seed, input_ids=record.input_ids)
        if record.stats is not None and mot.generation.usage is not None:
            mot.generation.usage["prompt_tokens_details"] = {"cached_tokens": record.stats.cached_tokens}
        if self._use_caches and isinstance(output, GenerateDecoderOnlyOutput):
            # Mellea's per-output cache entry; the KV itself is in spanctx's store
            sequence = output.sequences[0]
            self.cache_put(id(mot.value), HFAloraCacheInfo(kv_cache=None, merged_token_ids=sequence,
                                                           merged_attention=torch.ones_like(sequence),
                                                           q_end=record.input_ids.shape[1]))

    def _count(self, stats: GenerationStats) -> None:
        with self._counts_lock:
            self._counts = self._counts.plus(stats)

    # -- raw prompts ---------------------------------------------------------------------

    async def _generate_from_raw(self, actions: Sequence, ctx, *, format=None, model_options: dict | None = None,
                                 tool_calls: bool = False):
        for action in actions:
            refuse_multimodal(action, None)
        await self.do_generate_walks(list(actions))
        if tool_calls:
            MelleaLogger.get_logger().warning("The raw endpoint does not support tool calling at the moment.")
        options = self._simplify_and_merge(model_options)
        request = GenerateRequest.of(self._make_backend_specific_and_remove(options), options, self._tokenizer)
        prompts = [self.formatter.print(action) for action in actions]
        outputs = await asyncio.to_thread(self._run_raw, prompts, request, format)
        results, totals = [], {"prompt_tokens": 0, "completion_tokens": 0}
        for action, prompt, (ids, result, output) in zip(actions, prompts, outputs):
            mot = ModelOutputThunk(value=result.text)
            usage = {"prompt_tokens": len(ids), "completion_tokens": len(result.token_ids),
                     "total_tokens": len(ids) + len(result.token_ids),
                     "prompt_tokens_details": {"cached_tokens": result.stats.cached_tokens}}
            totals["prompt_tokens"] += usage["prompt_tokens"]
            totals["completion_tokens"] += usage["completion_tokens"]
            mot.generation.usage = usage
            mot.generation.model = self._model_id
            mot.generation.provider = mot.raw.provider = self._provider
            if self._use_caches:
                mot.raw.response = output
            if options.get(ModelOption.LOGITS):
                mot.generation.logits = result.scores
            if options.get(ModelOption.RAW_LOGITS):
                mot.generation.raw_logits = result.logits
            mot.parsed_repr = action.parse(mot) if isinstance(action, Component) else mot.value
            log = GenerateLog()
            log.prompt, log.backend, log.model_options = prompt, f"hf::{self.model_id!s}", options
            log.date, log.model_output, log.action = datetime.datetime.now(), result.text, action
            log.extra = {"format": format, "seed": options.get(ModelOption.SEED)}
            mot._generate_log = log
            results.append(mot)
        usage = {**totals, "total_tokens": totals["prompt_tokens"] + totals["completion_tokens"]} if results else None
        return results, usage

    def _run_raw(self, prompts: Sequence[str], request: GenerateRequest, format) -> list:
        """Worker thread: ``(prompt ids, Result, HF-style output)`` per prompt. Rows that
        need their own processors (a grammar mask, scores, stop strings) run one by one."""
        with self._generation_lock:
            contexts = [Context().append(p) for p in prompts]
            ids = [self._runtime.token_ids(c) for c in contexts]
            max_new = request.new_tokens(max(map(len, ids)), self._model.generation_config,
                                         self._runtime.max_positions)
            one_by_one = (format is not None or request.output_scores or request.output_logits
                          or "stop_strings" in request.kwargs)
            if one_by_one:
                results = []
                for ctx in contexts:
                    kwargs = dict(request.kwargs)
                    if format is not None:
                        kwargs["logits_processor"] = [
                            *kwargs.get("logits_processor", []),
                            GrammarMask(json_matcher(self._runtime, JsonFormat.of(format).schema),
                                        eos_ids(self._runtime))]
                    results.append(self._runtime.generate(ctx, max_new, output_scores=request.output_scores,
                                                          output_logits=request.output_logits, **kwargs))
            else:
                results = self._runtime.generate_batch(contexts, max_new, **request.kwargs)
            for result in results:
                self._count(result.stats)
            return [(row_ids, result, hf_output(row_ids, result, self._device))
                    for row_ids, result in zip(ids, results)]

    # -- intrinsics and adapters ---------------------------------------------------------

    def _generate_intrinsic_with_adapter_scope(self, adapter, generate_func, *args, **kwargs):
        return self._generate_with_adapter(adapter.qualified_name, generate_func, *args, **kwargs)

    def _generate_composed_local_file_with_adapter_scope(self, adapter, generate_func, *args, **kwargs):
        return self._generate_with_adapter(adapter.weights.qualified_name, generate_func, *args, **kwargs)

    def _generate_with_adapter(self, name: str, generate_func, tokenizer, model, generate_input, other_input):
        """Mellea's intrinsic generation (``generate_func``) with its ``model.generate``
        served by spanctx and adapter ``name``."""
        with self._generation_lock:
            self.load_peft_adapter(name)
            return generate_func(tokenizer, _AdapterModel(self, name, model), generate_input, other_input)

    def _generate_ids(self, input_ids: torch.Tensor, adapter: str | None, hf_kwargs: dict):
        """``model.generate(input_ids, **hf_kwargs)`` through spanctx; the prompt's spans
        come from the longest recent chat prompt that starts it (``PromptMemory``)."""
        if input_ids.ndim != 2 or input_ids.shape[0] != 1:
            raise NotImplementedError(f"spanctx's Mellea backend generates for one prompt, got ids {tuple(input_ids.shape)}")
        ids = input_ids[0].tolist()
        hf_kwargs = {k: v for k, v in hf_kwargs.items() if k != "attention_mask"}
        request = GenerateRequest.of(hf_kwargs, tokenizer=self._tokenizer)
        with self._generation_lock:
            prompt = self._prompts.context_for(ids)
            result = self._runtime.generate(
                prompt, request.new_tokens(len(ids), self._model.generation_config, self._runtime.max_positions),
                adapter=adapter, output_scores=request.output_scores, output_logits=request.output_logits,
                **request.kwargs)
            self._count(result.stats)
            return hf_output(ids, result, input_ids.device)

    def load_peft_adapter(self, adapter_qualified_name: str) -> None:
        """Load a registered adapter into spanctx (idempotent). An aLoRA applies from the
        last occurrence of its invocation in each prompt."""
        adapter = self._added_adapters.get(adapter_qualified_name)
        if adapter is None or isinstance(adapter, EmbeddedIntrinsicAdapter):
            super().load_peft_adapter(adapter_qualified_name)  # Mellea's errors for these
            return
        with self._generation_lock:
            if adapter_qualified_name not in self._runtime.list_adapters():
                self._runtime.add_adapter(adapter_qualified_name, adapter.path, alora_start="in_prompt")
            self._loaded_adapters[adapter_qualified_name] = adapter

    def unload_peft_adapter(self, adapter_qualified_name: str) -> None:
        """Unload an adapter from spanctx; a no-op (logged) when it is not loaded."""
        with self._generation_lock:
            if self._loaded_adapters.pop(adapter_qualified_name, None) is None:
                MelleaLogger.get_logger().info(
                    f"could not unload adapter {adapter_qualified_name} for backend {self}: adapter is not loaded")
                return
            if adapter_qualified_name in self._runtime.list_adapters():
                self._runtime.unload_adapter(adapter_qualified_name)

    def activate_peft_adapter(self, adapter_qualified_name: str) -> None:
        """Nothing to do: spanctx switches the adapter on for the calls that use it."""

    def deactivate_peft_adapter(self, adapter_qualified_name: str) -> None:
        """Nothing to do: outside a call that uses it, no adapter runs."""


def _with_cancel(kwargs, event: threading.Event) -> dict:
    """``kwargs`` with a stopping criterion that ends generation once ``event`` is set."""
    out = dict(kwargs)
    out["stopping_criteria"] = StoppingCriteriaList([_StopWhenSet(event), *(out.get("stopping_criteria") or [])])
    return out

