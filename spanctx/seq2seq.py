"""``Seq2SeqRuntime``: encoder-decoder models (T5, BART, ...) over the bounded span store.

A call names a **source** (the encoder's input: text or token ids) and, optionally, a
decoder prompt ``ctx`` (a ``Context`` of text / token-id spans that the answer must
follow: a shared prefix, a forced start). The source is encoded once per distinct
source: its encoder output and every decoder layer's cross-attention KV are stored under
the source's key, in the same store as decoder-only spans (budgeted in bytes, namespaced
by the model's fingerprint and the salt). Decoder spans are stored like decoder-only
spans, keyed after the source. So::

    rt = Seq2SeqRuntime.from_pretrained("tiny-t5")
    rt.generate("summarize: ...", max_new_tokens=32)       # encodes the source
    rt.rank("summarize: ...", ["candidate a", "candidate b"])  # reuses it: one decoder pass
    rt.hidden_states("summarize: ...", "mean")            # the encoder output, stored

Refused, with the reason in the error: parallel groups and chat spans in the decoder
prompt (``Context.parallel``: the decoder has no position-independent spans here; a chat
template is a decoder-only convention), a ``Context`` as the source (the encoder is
bidirectional: every source token sees every other, so a source has no reusable parts),
adapters (aLoRA is a causal-LM method) and beam search (as everywhere in spanctx).
Exactness: greedy tokens equal HF ``generate`` on the same source and decoder ids, and
logits equal a full HF forward (``tests/test_seq2seq.py``).
"""

from __future__ import annotations

import threading
import time
from collections.abc import Mapping, Sequence
from typing import Literal

import torch

from .cache.fingerprint import model_namespace
from .cache.index import EvictionPolicy, lru
from .cache.store import KVStore, default_budget_bytes
from .core.keys import root_key, salted_namespace, span_key
from .core.options import merge_options
from .core.prompt import PromptResolver
from .core.spans import Context, Span
from .engine.decoding import seeded
from .engine.encoder_decoder import DecoderPrompt, Seq2SeqEngine, SourceKV
from .features.scoring import Candidate, Ranked, Score
from .session.results import GenerationStats, Result

__all__ = ["Seq2SeqRuntime", "Source"]

Source = str | Sequence[int]
SourceReduction = Literal["mean", "sum", "first", "last"]


class Seq2SeqRuntime:
    """An encoder-decoder model, its tokenizer and a bounded store (arguments as for
    ``spanctx.Runtime``: ``store_bytes`` or a shared ``store``, ``policy``, ``salt``,
    ``model_identity``, ``generation_defaults``)."""

    def __init__(self, model, tokenizer, store_bytes: int | None = None, *, store: KVStore | None = None,
                 policy: EvictionPolicy = lru, salt: str | None = None, model_identity: str | None = None,
                 generation_defaults: Mapping[str, object] | None = None) -> None:
        if store is not None and store_bytes is not None:
            raise ValueError("pass store_bytes or store, not both")
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.device = model.device
        self.namespace = model_namespace(model, model_identity)
        self.salt = salt
        self.store = store if store is not None else KVStore(
            default_budget_bytes(self.device) if store_bytes is None else store_bytes, policy)
        self.engine = Seq2SeqEngine(self.model, self.store)
        self.resolver = PromptResolver(tokenizer, self.namespace, model.config.get_text_config().vocab_size)
        self.generation_defaults: dict[str, object] = dict(generation_defaults or {})
        merge_options(self.generation_defaults, {})  # reject bad defaults now
        self._lock = threading.RLock()

    @classmethod
    def from_pretrained(cls, name_or_path: str, *, device: str | None = None, dtype: torch.dtype | str | None = None,
                        store_bytes: int | None = None, **model_kwargs) -> Seq2SeqRuntime:
        """A runtime on a seq2seq preset (``tiny-t5``, ``tiny-bart``, ``t5-base``: random
        weights), a local model folder or a hub id (``AutoModelForSeq2SeqLM``)."""
        from transformers import AutoModelForSeq2SeqLM

        from .loading import load_model

        model, tokenizer = load_model(name_or_path, model_class=AutoModelForSeq2SeqLM, device=device, dtype=dtype,
                                      **model_kwargs)
        return cls(model, tokenizer, store_bytes)

    # -- ids and keys -------------------------------------------------------------------

    def source_ids(self, source: Source) -> tuple[int, ...]:
        """The encoder's input ids: text through the tokenizer with its special tokens
        (T5's appends ``</s>``), or token ids as given."""
        if isinstance(source, Context):
            raise TypeError("the source is text or token ids, not a Context: the encoder is bidirectional, so a "
                            "source has no reusable parts (and no parallel groups); decoder prompts are Contexts")
        if isinstance(source, str):
            ids = tuple(self.tokenizer(source)["input_ids"])
        else:
            ids = self.resolver.span_ids(Span(source))
        if not ids:
            raise ValueError("the source is empty")
        return ids

    def decoder_ids(self, ctx: Context | None = None) -> tuple[int, ...]:
        """The decoder prompt's ids: the start token, then ``ctx``'s spans."""
        return tuple(t for group in self._groups(ctx) for t in group)

    def _groups(self, ctx: Context | None) -> list[tuple[int, ...]]:
        groups = [(self.engine.start_id,)]
        for node in ctx.spans if ctx is not None else ():
            if not isinstance(node, Span):
                raise ValueError("parallel groups are not supported in a seq2seq decoder prompt; append the spans "
                                 "one after the other")
            if node.is_chat:
                raise ValueError("chat spans are not supported in a seq2seq decoder prompt (chat templates belong "
                                 "to decoder-only models); pass the text or the ids")
            groups.append(self.resolver.span_ids(node))
        return groups

    def _prepare(self, source: Source, ctx: Context | None, reuse: bool, salt: str | None
                 ) -> tuple[SourceKV, DecoderPrompt, int]:
        """The source's KV, the decoder prompt's KV, and how many source tokens were reused."""
        namespace = salted_namespace(self.namespace, salt if salt is not None else self.salt)
        src = self.source_ids(source)
        groups = self._groups(ctx)
        # the source's key: its ids after the root. No decoder-only span shares it (the
        # namespace names the model class) and decoder spans chain after it, never the root.
        keys, key = [], span_key(root_key(namespace), src, namespace)
        source = key
        for group in groups:
            keys.append(key := span_key(key, group, namespace))
        encoded, hit = self.engine.source(source, src, store=reuse)
        return encoded, self.engine.decoder_prompt(encoded, keys, groups, store=reuse), len(src) if hit else 0

    # -- calls --------------------------------------------------------------------------

    def generate(self, source: Source, ctx: Context | None = None, max_new_tokens: int | None = None, *,
                 reuse: bool = True, salt: str | None = None, **generate_kwargs) -> Result:
        """Generate the decoder's output for ``source`` after the decoder prompt ``ctx``
        (default: the start token only). Options merge as in ``spanctx.options``;
        ``reuse=False`` computes everything and neither reads nor writes the store. The
        stats count source and decoder-prompt tokens together."""
        call = dict(generate_kwargs)
        if max_new_tokens is not None:
            call["max_new_tokens"] = max_new_tokens
        opts = merge_options(self.generation_defaults, call)
        started = time.perf_counter()
        with self._lock, torch.inference_mode(), seeded(opts.seed, self.device):
            encoded, prompt, source_hit = self._prepare(source, ctx, reuse, salt)
            new = self.engine.generate(encoded, prompt, **opts.hf_kwargs(self.tokenizer.pad_token_id)).tolist()
        stats = GenerationStats.measured(prompt_tokens=encoded.num_tokens + len(prompt.token_ids),
                                         cached_tokens=source_hit + prompt.cached_tokens, new_tokens=len(new),
                                         started=started, first_token_at=None)
        return Result(text=self.tokenizer.decode(new, skip_special_tokens=True), token_ids=tuple(new), stats=stats)

    def next_token_logits(self, source: Source, ctx: Context | None = None, *, reuse: bool = True,
                          salt: str | None = None) -> torch.Tensor:
        """Logits ``[vocab]`` (float32) of the decoder token after ``ctx`` for ``source``."""
        with self._lock, torch.inference_mode():
            encoded, prompt, _ = self._prepare(source, ctx, reuse, salt)
            return self.engine.logits(encoded, prompt)

    def score(self, source: Source, candidates: Sequence[Candidate], ctx: Context | None = None, *,
              reuse: bool = True, salt: str | None = None, batch_size: int = 32) -> list[Score]:
        """Per candidate (text or ids, tokenized as a decoder span), the log-probabilities of
        its tokens after ``ctx`` for ``source``. The source is computed once (or reused) and
        the candidates run ``batch_size`` per decoder forward over its stored KV."""
        if isinstance(candidates, (str, Span)):
            raise TypeError("candidates is a sequence of candidates; wrap a single one in a list")
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        cand_ids = [self.resolver.span_ids(c if isinstance(c, Span) else Span(c)) for c in candidates]
        out: list[Score] = []
        with self._lock, torch.inference_mode():
            encoded, prompt, _ = self._prepare(source, ctx, reuse, salt)
            for start in range(0, len(cand_ids), batch_size):
                batch = cand_ids[start:start + batch_size]
                for ids, logprobs in zip(batch, self.engine.candidate_logprobs(encoded, prompt, batch)):
                    out.append(Score(tuple(ids), logprobs))
        return out

    def rank(self, source: Source, candidates: Sequence[Candidate], ctx: Context | None = None, *,
             by: Literal["logprob", "mean_logprob"] = "logprob", reuse: bool = True, salt: str | None = None,
             batch_size: int = 32) -> list[Ranked]:
        """``candidates`` best first by ``by`` (ties keep input order); see ``score``."""
        if by not in ("logprob", "mean_logprob"):
            raise ValueError(f"rank by 'logprob' or 'mean_logprob', got {by!r}")
        scores = self.score(source, candidates, ctx, reuse=reuse, salt=salt, batch_size=batch_size)
        ranked = [Ranked(i, c, s) for i, (c, s) in enumerate(zip(candidates, scores))]
        return sorted(ranked, key=lambda r: -getattr(r.score, by))

    def hidden_states(self, source: Source, reduction: SourceReduction = "mean", *, reuse: bool = True,
                      salt: str | None = None) -> torch.Tensor:
        """An embedding ``[hidden]`` (float32) of ``source``: the encoder's last hidden
        states reduced over the source's tokens (``"mean"``, ``"sum"``, ``"first"`` or
        ``"last"``). Read off the stored source entry: a stored source costs no forward."""
        reducers = {"mean": lambda h: h.mean(0), "sum": lambda h: h.sum(0), "first": lambda h: h[0],
                    "last": lambda h: h[-1]}
        if reduction not in reducers:
            raise ValueError(f"reduction must be one of {sorted(reducers)}, got {reduction!r}")
        with self._lock, torch.inference_mode():
            encoded, _, _ = self._prepare(source, None, reuse, salt)
            return reducers[reduction](encoded.encoder_hidden[0].float())

    # -- refused ------------------------------------------------------------------------

    def add_adapter(self, *args, **kwargs):
        """Refused: aLoRA (and spanctx's adapter path) is for causal LMs."""
        raise NotImplementedError("adapters are not supported on encoder-decoder models in spanctx (aLoRA is a "
                                  "causal-LM method); load a merged model instead")
