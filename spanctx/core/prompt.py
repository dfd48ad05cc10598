"""From a ``Context`` to the token ids and span keys of one prompt: the one resolver.

Every call (single, batch row, check, score) resolves its context here, whatever it holds:
chat messages, parallel groups, an aLoRA invocation, a tenant salt.

Tokenization rule: each span is tokenized on its own, with no special tokens, and the
prompt is the concatenation of the pieces, after one BOS token when the tokenizer adds
one (as Llama's does). So ``"Hello" + " world"`` can tokenize differently from
``"Hello world"`` with a BPE tokenizer: span boundaries are token boundaries. That is
what lets a span's KV be stored once and reused. Chat spans are first rendered by the
tokenizer's chat template into text spans (``chat.py``); a path that starts with one gets
no BOS: the template writes it.

Keys (``keys.py``), all under the call's namespace (the model's, salted per tenant):
- a dependent span: ``span_key(parent key, ids)``;
- a group member: ``parallel_key(anchor key, ids)``: its KV, computed right after its
  anchor, is valid wherever it follows that anchor;
- a group: ``group_key(parent key, member keys in order, repair)``; what follows a group
  chains this key, since its KV depends on the group's order and repair (a lone member
  right after its anchor is exact, so its group key names no repair);
- a plain LoRA computes every token with its weights: every key is under its namespace;
- an aLoRA changes only the tokens from its invocation on (PEFT applies it from the LAST
  occurrence of its invocation tokens): the spans before it keep their base keys, and the
  invocation is appended (unless the context already ends with it) as one span under the
  adapter's namespace, chained after the base part. An aLoRA added with
  ``alora_start="in_prompt"`` instead applies from the last occurrence of its invocation
  in the context (prompt formats that put it inside the last message, as Mellea's
  intrinsics do): nothing is appended, and the invocation and every token after it are
  that one span. The base part always ends before the invocation starts: a span that
  runs into it is cut there.
"""

from __future__ import annotations

import functools
import itertools
from collections.abc import Sequence

import attrs

from .chat import ChatRenderer
from .keys import group_key, parallel_key, root_key, salted_namespace, span_key
from .placement import GroupLayout, Repair
from .plan import PlanSegment
from .spans import Context, ParallelGroup, Span

__all__ = ["NO_REPAIR", "PromptResolver", "ResolvedPrompt", "last_occurrence"]

NO_REPAIR = Repair("none")


@attrs.frozen
class ResolvedPrompt:
    """A prompt ready to plan: its ids and, per span, its key and token count.

    ``groups``: the parallel groups (their members are segments); empty for a prompt of
    dependent spans only. ``invocation_start``: for an aLoRA call, the prompt index of
    the invocation (tokens before it run on base weights); else None.
    """

    token_ids: tuple[int, ...]
    segments: tuple[PlanSegment, ...]
    groups: tuple[GroupLayout, ...] = ()
    invocation_start: int | None = None

    @property
    def num_tokens(self) -> int:
        return len(self.token_ids)

    def span_ranges(self) -> tuple[tuple[int, int], ...]:
        out, start = [], 0
        for seg in self.segments:
            out.append((start, start + seg.num_tokens))
            start += seg.num_tokens
        return tuple(out)


class PromptResolver:
    """Tokenizes spans and chains their keys, with memoization (see the module rules)."""

    def __init__(self, tokenizer, namespace: bytes, vocab_size: int, cache_size: int = 1 << 16):
        self.tokenizer = tokenizer
        self.namespace = namespace
        self.vocab_size = vocab_size
        self.bos = _bos_prefix(tokenizer)
        self.chat = ChatRenderer(tokenizer)
        self._span_ids = functools.lru_cache(maxsize=cache_size)(self._tokenize)
        self._key = functools.lru_cache(maxsize=cache_size)(span_key)

    def resolve(self, ctx: Context, *, repair: Repair = NO_REPAIR, salt: str | None = None,
                adapter_namespace: bytes | None = None, invocation: tuple[int, ...] | None = None,
                invocation_in_prompt: bool = False) -> ResolvedPrompt:
        """The prompt of ``ctx``. ``repair`` names how its parallel groups are repaired (it
        enters their keys); ``adapter_namespace`` with ``invocation`` is an aLoRA call,
        without it a plain LoRA call; ``salt`` keeps a tenant's keys apart.
        ``invocation_in_prompt``: the aLoRA applies from the last occurrence of its
        invocation in ``ctx`` and nothing is appended (else it is appended)."""
        nodes = ctx.spans
        if not nodes:
            raise ValueError("the context is empty: append at least one span before generating")
        base = salted_namespace(self.namespace, salt)
        lora = adapter_namespace is not None and invocation is None
        namespace = salted_namespace(adapter_namespace, salt) if lora else base
        prompt = self._lay_out(nodes, namespace, repair)
        if invocation is None:
            return prompt
        if prompt.groups:
            raise ValueError("adapters on prompts with parallel groups are not supported; "
                             "append the group's spans as dependent spans to use an adapter")
        return _with_invocation(prompt, invocation, base, salted_namespace(adapter_namespace, salt),
                                invocation_in_prompt)

    def span_ids(self, span: Span) -> tuple[int, ...]:
        return self._span_ids(span)

    def _lay_out(self, nodes: Sequence[Span | ParallelGroup], namespace: bytes, repair: Repair) -> ResolvedPrompt:
        starts_with_chat = isinstance(nodes[0], Span) and nodes[0].is_chat
        ends: Sequence[int | None] = range(1, len(nodes) + 1)  # expanded node count after each node
        if any(isinstance(n, Span) and n.is_chat for n in nodes):
            nodes, ends = self.chat.expand(nodes)
        key = root_key(namespace)
        token_ids: list[int] = []
        segments: list[PlanSegment] = []
        groups: list[GroupLayout] = []
        if self.bos and not starts_with_chat:
            key = self._key(key, self.bos, namespace)
            segments.append(PlanSegment(key, len(self.bos)))
            token_ids += self.bos
        after_node = [(key, len(token_ids))]  # (key, tokens) after the first n expanded nodes
        for node in nodes:
            if isinstance(node, ParallelGroup):
                anchor_key, anchor_end = after_node[_expanded_depth(node.anchor_depth, ends)]
                first = len(segments)
                exact = len(node.members) == 1 and len(token_ids) == anchor_end
                for member in node.members:
                    ids = self._member_ids(member)
                    segments.append(PlanSegment(parallel_key(anchor_key, ids, namespace), len(ids)))
                    token_ids += ids
                mode = "none" if exact else str(repair)
                key = group_key(key, [s.key for s in segments[first:]], mode, namespace)
                groups.append(GroupLayout(key, first, len(segments), anchor_end))
            else:
                ids = self._span_ids(node)
                key = self._key(key, ids, namespace)
                segments.append(PlanSegment(key, len(ids)))
                token_ids += ids
            after_node.append((key, len(token_ids)))
        return ResolvedPrompt(tuple(token_ids), tuple(segments), tuple(groups))

    def _member_ids(self, member: Span) -> tuple[int, ...]:
        if member.is_chat:
            raise ValueError("a parallel group's members are text or token ids, not chat messages: "
                             "render documents into the conversation as plain spans")
        return self._span_ids(member)

    def _tokenize(self, span: Span) -> tuple[int, ...]:
        if span.is_text:
            ids = tuple(self.tokenizer(span.content, add_special_tokens=False)["input_ids"])
            if not ids:
                raise ValueError(f"span {span.content!r} tokenizes to no tokens")
            return ids
        bad = [t for t in span.content if t >= self.vocab_size]
        if bad:
            raise ValueError(f"token ids {bad[:5]} are outside the model's vocabulary of {self.vocab_size}")
        return span.content


def _expanded_depth(depth: int, ends: Sequence[int | None]) -> int:
    """The node count after chat expansion of an anchor ``depth`` nodes deep."""
    if depth == 0:
        return 0
    expanded = ends[depth - 1]
    if expanded is None:
        raise ValueError("a parallel group is anchored inside a chat message that the template cannot cut "
                         "after: anchor it at the whole path or at the root")
    return expanded


def _with_invocation(base: ResolvedPrompt, invocation: tuple[int, ...], base_namespace: bytes,
                     namespace: bytes, in_prompt: bool) -> ResolvedPrompt:
    """``base`` as an aLoRA call's prompt (see the module rules). Pure."""
    ids, n = base.token_ids, len(invocation)
    if in_prompt:
        start = last_occurrence(ids, invocation)
        if start is None:
            raise ValueError(f"the prompt does not hold the aLoRA's invocation {list(invocation)}: an adapter "
                             "added with alora_start='in_prompt' applies from its last occurrence")
        invocation = ids[start:]  # the invocation and everything after it run with the adapter
    else:
        ends_with_it = len(ids) >= n and ids[len(ids) - n:] == invocation
        start = len(ids) - n if ends_with_it else len(ids)
    segments: list[PlanSegment] = []
    parent = root_key(base_namespace)
    for seg, (seg_start, seg_end) in zip(base.segments, base.span_ranges()):
        if seg_end <= start:
            segments.append(seg)
            parent = seg.key
            continue
        if seg_start < start:
            head = ids[seg_start:start]
            parent = span_key(parent, head, base_namespace)
            segments.append(PlanSegment(parent, len(head)))
        break
    segments.append(PlanSegment(span_key(parent, invocation, namespace), len(invocation)))
    token_ids = tuple(itertools.chain(ids[:start], invocation))
    return ResolvedPrompt(token_ids, tuple(segments), invocation_start=start)


def last_occurrence(ids: Sequence[int], pattern: Sequence[int]) -> int | None:
    """Where the last occurrence of ``pattern`` in ``ids`` starts, or None. Pure."""
    n, pattern = len(pattern), tuple(pattern)
    return next((i for i in range(len(ids) - n, -1, -1) if tuple(ids[i:i + n]) == pattern), None)


def _bos_prefix(tokenizer) -> tuple[int, ...]:
    """``(bos_id,)`` when the tokenizer puts BOS in front of a plain encode, else ``()``."""
    bos = getattr(tokenizer, "bos_token_id", None)
    if bos is None:
        return ()
    ids = tokenizer("a", add_special_tokens=True)["input_ids"]
    return (bos,) if ids and ids[0] == bos else ()
