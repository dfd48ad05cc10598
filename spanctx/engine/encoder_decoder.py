"""Encoder-decoder models (T5, BART, ...): a source encoded once, decoder prompts over it.

A source's store entry (``SourceKV``) holds everything a decoder call over it reads and
nothing writes: per decoder layer the cross-attention keys and values ``[1, H, S_src, D]``
and the encoder's last hidden state ``[1, S_src, hidden]``. With it, the source never
runs through the encoder again, and no decoder layer projects it again.

Decoder prompts are chains of token groups (the decoder start token, then the spans of a
``Context``) whose self-attention KV is stored as for a decoder-only model, under keys
chained after the source's key: a decoder token's KV depends on the source through
cross-attention. The caller names the keys (``spanctx.seq2seq``); this module only looks
them up, computes what is missing in one decoder forward, and stores it.

Nothing here writes a stored tensor: caches handed to the model wrap stored tensors in
fresh layers (views); self-attention updates concatenate into new tensors, and
cross-attention layers marked as computed are only read (``EncoderDecoderCache``).
"""

from __future__ import annotations

from collections.abc import Sequence

import attrs
import torch
from transformers import DynamicCache, EncoderDecoderCache
from transformers.modeling_outputs import BaseModelOutput

from ..hf import cache_kwargs
from ..cache.kv import KVSlice, as_cache, assemble, cut, extract, repeat_batch
from ..cache.store import KVStore, SpanKV

__all__ = ["Seq2SeqEngine", "SourceKV"]


@attrs.frozen(eq=False)
class SourceKV(SpanKV):
    """One encoded source: the cross-attention KV of every decoder layer (``keys`` /
    ``values``, ``[1, H, S_src, D]``) and the encoder's output ``[1, S_src, hidden]``."""

    encoder_hidden: torch.Tensor = attrs.field(kw_only=True)

    @property
    def nbytes(self) -> int:
        return super().nbytes + self.encoder_hidden.numel() * self.encoder_hidden.element_size()

    def encoder_outputs(self, batch: int = 1) -> BaseModelOutput:
        return BaseModelOutput(last_hidden_state=self.encoder_hidden.expand(batch, -1, -1))

    def attention_mask(self, batch: int = 1) -> torch.Tensor:
        """``[batch, S_src]`` ones: a source is one unpadded sequence."""
        return torch.ones(batch, self.num_tokens, dtype=torch.long, device=self.encoder_hidden.device)


@attrs.frozen
class DecoderPrompt:
    """A decoder prompt as computed KV: its ids, the self-attention KV of all of them (in
    pieces, one per group), and how many tokens came from the store."""

    token_ids: tuple[int, ...]
    pieces: tuple[KVSlice, ...]
    cached_tokens: int

    def cache(self, source: SourceKV, batch: int = 1, length: int | None = None) -> EncoderDecoderCache:
        """A fresh cache over the first ``length`` prompt tokens (default: all but the last,
        which the final call feeds), ``batch`` rows, and the source's cross-attention KV."""
        length = len(self.token_ids) - 1 if length is None else length
        own = assemble(cut(self.pieces, length)) if length else DynamicCache()
        if batch > 1 and length:
            own = repeat_batch(own, batch)
        return EncoderDecoderCache(own, repeat_batch(as_cache(source), batch))


class Seq2SeqEngine:
    """Runs an ``AutoModelForSeq2SeqLM`` over a ``KVStore``: the only code of the seq2seq
    path that calls the model or writes the store."""

    def __init__(self, model, store: KVStore) -> None:
        if not getattr(model.config, "is_encoder_decoder", False):
            raise ValueError(f"{type(model).__name__} is not an encoder-decoder model; use spanctx.Runtime")
        self.model = model
        self.store = store
        self.start_id = _decoder_start_id(model)

    # -- the source -------------------------------------------------------------------

    def source(self, key: bytes, ids: Sequence[int], *, store: bool = True) -> tuple[SourceKV, bool]:
        """The encoded source ``ids`` and whether it came from the store (under ``key``).
        Computing it runs the encoder once and the decoder on its start token: that step
        is where each decoder layer projects the source into its cross-attention KV."""
        if store and (hit := self.store.lookup(key)) is not None:
            return hit, True
        input_ids = torch.tensor([list(ids)], device=self.model.device)
        encoder_hidden = self.model.get_encoder()(input_ids=input_ids).last_hidden_state
        cache = EncoderDecoderCache(DynamicCache(), DynamicCache())
        decoder = self.model.get_decoder()
        decoder(input_ids=torch.tensor([[self.start_id]], device=input_ids.device),
                encoder_hidden_states=encoder_hidden, encoder_attention_mask=torch.ones_like(input_ids),
                use_cache=True, **cache_kwargs(decoder, cache))
        cross = extract(cache.cross_attention_cache, 0, len(ids))
        source = SourceKV(cross.keys, cross.values, encoder_hidden=encoder_hidden)
        if store:
            self.store.put(key, source)
        return source, False

    # -- decoder prompts --------------------------------------------------------------

    def decoder_prompt(self, source: SourceKV, keys: Sequence[bytes], groups: Sequence[Sequence[int]], *,
                       store: bool = True) -> DecoderPrompt:
        """The self-attention KV of the decoder prompt ``groups`` (the first is the start
        token) after ``source``: the longest stored prefix of groups (by ``keys``) is
        reused, the rest is computed in one decoder forward and stored group by group."""
        ids = tuple(t for group in groups for t in group)
        pieces: list[KVSlice] = []
        hit = 0
        with self.store.locked(keys if store else ()):
            for key in keys if store else ():
                kv = self.store.lookup(key)
                if kv is None:
                    break
                pieces.append(KVSlice.whole(kv))
                hit += 1
            cached = sum(len(g) for g in groups[:hit])
            if hit == len(groups):
                return DecoderPrompt(ids, tuple(pieces), cached)
            cache = EncoderDecoderCache(assemble(pieces) if pieces else DynamicCache(),
                                        repeat_batch(as_cache(source), 1))
            self.model(encoder_outputs=source.encoder_outputs(), attention_mask=source.attention_mask(),
                       decoder_input_ids=torch.tensor([list(ids[cached:])], device=self.model.device),
                       use_cache=True, logits_to_keep=1, **cache_kwargs(self.model, cache))
            start = cached
            for key, group in zip(keys[hit:], groups[hit:]):
                kv = extract(cache.self_attention_cache, start, start + len(group))
                if store:
                    self.store.put(key, kv)
                pieces.append(KVSlice.whole(kv))
                start += len(group)
        return DecoderPrompt(ids, tuple(pieces), cached)

    # -- final calls ------------------------------------------------------------------

    def generate(self, source: SourceKV, prompt: DecoderPrompt, **generate_kwargs) -> torch.Tensor:
        """HF ``generate`` after ``prompt``; returns the new ids ``[n]`` only."""
        ids = torch.tensor([list(prompt.token_ids)], device=self.model.device)
        # a decoder mask as long as the ids tells generate they are the WHOLE prompt, of
        # which the cache holds all but the last: it feeds only the uncached tail
        out = self.model.generate(encoder_outputs=source.encoder_outputs(), attention_mask=source.attention_mask(),
                                  decoder_input_ids=ids, decoder_attention_mask=torch.ones_like(ids),
                                  **cache_kwargs(self.model, prompt.cache(source)), **generate_kwargs)
        return out[0, ids.shape[1]:]

    def logits(self, source: SourceKV, prompt: DecoderPrompt) -> torch.Tensor:
        """Logits ``[vocab]`` (float32) for the decoder token after ``prompt``."""
        last = torch.tensor([[prompt.token_ids[-1]]], device=self.model.device)
        out = self.model(encoder_outputs=source.encoder_outputs(), attention_mask=source.attention_mask(),
                         decoder_input_ids=last, use_cache=True, **cache_kwargs(self.model, prompt.cache(source)))
        return out.logits[0, -1].float()

    def candidate_logprobs(self, source: SourceKV, prompt: DecoderPrompt,
                           candidates: Sequence[Sequence[int]]) -> list[tuple[float, ...]]:
        """Per candidate, the log-probability of each of its tokens after ``prompt``: ONE
        decoder forward over all candidates (right-padded: causal attention never lets a
        real token see the padding after it), over the shared prompt and source KV."""
        batch, longest = len(candidates), max(len(c) for c in candidates)
        rows = torch.full((batch, longest), self.start_id, dtype=torch.long)  # pad: any id
        rows[:, 0] = prompt.token_ids[-1]
        for i, cand in enumerate(candidates):
            rows[i, 1:len(cand)] = torch.tensor(list(cand[:-1]))
        out = self.model(encoder_outputs=source.encoder_outputs(batch), attention_mask=source.attention_mask(batch),
                         decoder_input_ids=rows.to(self.model.device), use_cache=True,
                         **cache_kwargs(self.model, prompt.cache(source, batch)))
        logprobs = torch.log_softmax(out.logits.float(), dim=-1)  # [B, L, V]
        return [tuple(logprobs[i, torch.arange(len(c)), torch.tensor(list(c))].tolist())
                for i, c in enumerate(candidates)]


def _decoder_start_id(model) -> int:
    config = model.generation_config if model.generation_config.decoder_start_token_id is not None else model.config
    start = config.decoder_start_token_id
    if start is None:
        raise ValueError(f"{type(model).__name__} has no decoder_start_token_id in its config")
    if isinstance(start, list):
        raise ValueError("a list of decoder start tokens (one per batch row) is not supported")
    return int(start)
