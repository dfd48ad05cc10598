"""Continuous batching on the static executor: generations join and leave between steps.

``Lanes`` runs up to ``max_lanes`` generations (lanes) on the static executor's buffers at
once. ``admit`` takes a one-row decode ``FinalCall`` (as ``FinalCall.tails`` builds it)
and lays its stored prefix in the buffers; ``step`` runs ONE model step for every lane:
the last token of each running lane and the whole tail of each lane admitted since the
last step, in one forward (a new request's prompt is prefilled while the others decode),
then picks each lane's next token as HF ``generate`` would (``decoding.TokenChooser``).
A lane ends at EOS or at its ``max_new_tokens`` (``step`` releases it), or when the caller
``release``s it (a stop string, a cancelled request). Releasing stores the spans its tail
computed (the engine's store rule, ``store``) and frees its slots. Greedy lanes give the
tokens they give alone (``tests/test_lanes.py``).

Slots. Slot 0 is scratch: padding tokens write it and no lane sees it. Each stored prefix
slice a lane needs is laid in a region of its own, keyed by the chain of slices up to it:
a lane whose prefix starts with a chain already laid (eight chats over one system prompt)
sees those regions (their owners get its bit, ``slots.row_bits``) instead of copying
them; a region is freed when no lane sees it. Each lane also gets one region for its
tail and its new tokens. Regions are taken first-fit from slot 1 (``SlotPool``), and each
step attends over the ladder's rung above the highest slot in use, so the step stays as
short as the running lanes allow. A step's shape is one the executor builds at warm-up:
decode tokens only, padded to ``rows_bucket``; with tails, padded to ``suffix_bucket``
and keeping ``keep_bucket`` logit rows (``Engine.warm_up_rows`` builds both).

What it refuses (``refuses``): adapters, seeded sampling (a lane's draws would depend on
the others'), the caller's logits processors and stopping criteria, stop strings (the
caller matches those on the text), and what the static executor refuses. The serve
scheduler runs such requests through ``Engine.run``.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING

import attrs
import torch

from ..cache import kv as kvops
from ..cache.span_kv import SpanKV
from .calls import FinalCall
from .decoding import TokenChooser
from .slots import NO_ROW, OWNER_FREE, row_bits
from .static_layout import (
    GRAPH_TOKENS,
    MAX_ROWS,
    StepInputs,
    keep_bucket,
    rows_bucket,
    suffix_bucket,
)
from .static_warmup import rung

if TYPE_CHECKING:
    from .static import StaticExecutor

__all__ = ["Lane", "LaneEvent", "Lanes", "SlotPool"]

SCRATCH = 0  # the slot padding tokens write
_CALLER_KWARGS = ("logits_processor", "stopping_criteria", "stop_strings")


class SlotPool:
    """First-fit regions of slots ``[1, size)`` (slot 0 is scratch). Pure host bookkeeping."""

    def __init__(self, size: int) -> None:
        self.size = size
        self._free: list[tuple[int, int]] = [(SCRATCH + 1, size)]  # sorted, disjoint, merged
        self._taken: dict[int, int] = {}  # start -> end

    def take(self, tokens: int) -> int | None:
        """The first slot of a free region of ``tokens`` slots (None: none is free)."""
        for i, (start, end) in enumerate(self._free):
            if end - start >= tokens:
                self._free[i:i + 1] = [(start + tokens, end)] if end - start > tokens else []
                self._taken[start] = start + tokens
                return start
        return None

    def give(self, start: int) -> int:
        """Free the region taken at ``start``; returns its end."""
        end = self._taken.pop(start)
        merged = sorted([*self._free, (start, end)])
        self._free = []
        for a, b in merged:
            if self._free and self._free[-1][1] == a:
                self._free[-1] = (self._free[-1][0], b)
            else:
                self._free.append((a, b))
        return end

    @property
    def high(self) -> int:
        """One past the highest slot taken (1 when none is: the scratch slot)."""
        return max(self._taken.values(), default=SCRATCH + 1)


@attrs.define(eq=False)
class _Region:
    """A stored slice laid at ``[start, start + tokens)``, seen by the lanes in ``users``."""

    piece: kvops.KVSlice  # held: the chain key names its tensors by identity
    start: int
    users: int = 0


@attrs.define(eq=False)
class Lane:
    """One generation in a ``Lanes``: its call, its lane index (its owner bit), its
    regions, its own slots (``own``: its tail, then its new tokens) and its tokens."""

    index: int
    call: FinalCall
    chooser: TokenChooser
    chains: tuple[tuple, ...]  # the keys of the prefix regions it sees
    own: int  # its region's first slot
    tail_ids: torch.Tensor  # [n - start] on the host
    tokens: list[int] = attrs.field(factory=list)
    finish: str | None = None  # "stop" (EOS), "length", or the caller's reason

    @property
    def row(self):
        return self.call.rows[0]

    @property
    def fed(self) -> bool:
        """Whether its tail has run (it has a token to feed)."""
        return bool(self.tokens)

    @property
    def cached_tokens(self) -> int:
        return self.row.start

    @property
    def prompt_tokens(self) -> int:
        return self.row.num_tokens

    def feed(self) -> tuple[int, int, int]:
        """The next decode step's (token, position, slot) for this lane."""
        made = len(self.tokens)
        return self.tokens[-1], self.row.num_tokens + made - 1, self.own + self.row.num_tokens - self.row.start + made - 1


@attrs.frozen
class LaneEvent:
    """A lane's token from one step; ``finish`` when the lane ended with it (then released);
    ``logits`` ``[V]`` (fp32, before any processor) when the lane was admitted with them."""

    lane: Lane
    token: int
    finish: str | None
    logits: torch.Tensor | None = None


def _chain_key(piece: kvops.KVSlice) -> tuple:
    return id(piece.kv), piece.start, piece.end, piece.moved_by


class Lanes:
    """A running decode batch on ``executor`` (see the module docstring); hold the executor
    with ``executor.running()`` while it lives (``Engine.lanes`` does). ``store(call,
    cache, offset)`` stores what a released lane's tail computed."""

    def __init__(self, executor: StaticExecutor, max_lanes: int,
                 store: Callable[[FinalCall, object, int], None]) -> None:
        if not 1 <= max_lanes <= MAX_ROWS - 1:
            raise ValueError(f"max_lanes must be in [1, {MAX_ROWS - 1}], got {max_lanes}")
        self.executor, self.max_lanes, self._store = executor, max_lanes, store
        self.pool = SlotPool(executor.max_tokens)
        self.lanes: list[Lane] = []
        self._regions: dict[tuple, _Region] = {}
        executor.owners.fill_(OWNER_FREE)
        self.steps = 0

    def __len__(self) -> int:
        return len(self.lanes)

    @property
    def joining(self) -> int:
        """Prompt tokens of the lanes whose tails run at the next step."""
        return sum(lane.tail_ids.shape[0] for lane in self.lanes if not lane.fed)

    # -- admission ---------------------------------------------------------------------

    def refuses(self, call: FinalCall) -> str | None:
        """Why ``call`` cannot be a lane at all (None: it can, when there is room)."""
        options = call.decode
        if options is None or len(call.rows) != 1:
            return "a lane is one row that decodes"
        if call.rows[0].alora_offset is not None:
            return "adapters run alone"
        if options.seed is not None:
            return "a seeded generation runs alone (its draws must not depend on other lanes)"
        caller = sorted(k for k in _CALLER_KWARGS if options.generate_kwargs.get(k))
        if caller:
            return f"{caller} run alone (a lane's stops are the caller's to match)"
        return self.executor.refuses_rows(call.rows, new_tokens=options.max_new_tokens, options=options)

    def admit(self, call: FinalCall) -> Lane | None:
        """Make ``call`` (which ``refuses`` accepts) a lane whose tail runs at the next
        ``step``; None when all lanes or the slots it needs are taken now."""
        if len(self.lanes) == self.max_lanes:
            return None
        row = call.rows[0]
        index = min(set(range(self.max_lanes)) - {lane.index for lane in self.lanes})
        chains, chain, fresh, position = [], (), [], 0
        for piece in row.prefix:  # the regions of the longest laid chain are seen, the rest laid anew
            chain = (*chain, _chain_key(piece))
            if not fresh and chain in self._regions:
                chains.append(chain)
            else:
                fresh.append((chain, piece, position))
            position += piece.num_tokens
        own_tokens = row.num_tokens - row.start + max(call.new_tokens - 1, 0)
        starts = [self.pool.take(n) for n in (own_tokens, *(p.num_tokens for _, p, _ in fresh))]
        if None in starts:
            for start in starts:
                if start is not None:
                    self.pool.give(start)
            return None
        own, *laid = starts
        owners, positions, bit = self.executor.owners, self.executor.slot_positions, self._bit(index)
        for (key, piece, first), start in zip(fresh, laid):
            self.executor.buffers.place([piece], start)
            self._regions[key] = _Region(piece, start)
            torch.arange(first, first + piece.num_tokens, out=positions[start:start + piece.num_tokens])
            chains.append(key)
        for key in chains:
            region = self._regions[key]
            region.users |= bit
            owners[region.start:region.start + region.piece.num_tokens].bitwise_or_(bit)
        self.executor.buffers.overwrite(own, own + own_tokens)
        chooser = TokenChooser.from_options(self.executor.model, call.decode, self.executor.device, row.num_tokens)
        tail = torch.tensor(call.prompts[0].token_ids[row.start:], dtype=torch.long)  # host ids: no device sync
        lane = Lane(index, call, chooser, tuple(chains), own, tail)
        self.lanes.append(lane)
        return lane

    @staticmethod
    def _bit(index: int) -> int:
        return int(row_bits(torch.tensor([index]))[0])

    # -- steps -------------------------------------------------------------------------

    def step(self, *, logits_for: frozenset[Lane] = frozenset()) -> list[LaneEvent]:
        """One model step of every lane (see the module docstring): a token per lane, the
        running lanes' first, then the new ones'; lanes that ended with it are released.
        ``logits_for``: lanes whose events carry their step's logits."""
        if not self.lanes:
            return []
        running, fresh = [lane for lane in self.lanes if lane.fed], [lane for lane in self.lanes if not lane.fed]
        fed = [lane.feed() for lane in running]  # (token, position, slot)
        positions, slots = [p for _, p, _ in fed], [s for _, _, s in fed]
        rows, keep = [lane.index for lane in running], list(range(len(running)))
        ids_tail = [torch.tensor([t for t, _, _ in fed], dtype=torch.long)]
        for lane in fresh:
            row, tail = lane.row, lane.tail_ids.shape[0]
            ids_tail.append(lane.tail_ids)
            positions.extend(range(row.start, row.num_tokens))
            slots.extend(range(lane.own, lane.own + tail))
            rows.extend([lane.index] * tail)
            keep.append(len(rows) - 1)
        tokens = len(rows)
        if not fresh:
            padded, kept = rows_bucket(tokens), rows_bucket(tokens)
            keep = list(range(kept))
        else:
            padded = suffix_bucket(tokens) if tokens <= GRAPH_TOKENS else tokens
            kept = keep_bucket(len(keep)) if tokens <= GRAPH_TOKENS else len(keep)
            keep += [keep[0]] * (kept - len(keep))
        pad = padded - tokens
        inputs = StepInputs(torch.cat([*ids_tail, torch.zeros(pad, dtype=torch.long)]),
                            torch.tensor(positions + [0] * pad), torch.tensor(slots + [SCRATCH] * pad),
                            torch.tensor(rows + [NO_ROW] * pad), torch.tensor(keep))
        length = rung(self.executor.ladder, self.pool.high)
        logits = self.executor.step(inputs, length)
        self.steps += 1
        order = running + fresh
        chosen = self._choose(order, logits)
        events = []
        for r, (lane, token) in enumerate(zip(order, chosen.tolist())):
            lane.tokens.append(token)
            if token in lane.chooser.eos_ids:
                lane.finish = "stop"
            elif len(lane.tokens) >= lane.call.new_tokens:
                lane.finish = "length"
            events.append(LaneEvent(lane, token, lane.finish, logits[r].float().clone() if lane in logits_for else None))
        for event in events:
            if event.finish is not None:
                self.release(event.lane, event.finish)
        return events

    def _choose(self, order: Sequence[Lane], logits: torch.Tensor) -> torch.Tensor:
        """Each lane's next token ``[len(order)]`` (device) from its logits row: lanes whose
        choice reads only the logits are chosen together, by options; the others alone."""
        groups: dict[tuple, list[int]] = {}
        for r, lane in enumerate(order):
            options = lane.call.decode
            key = ((r,) if lane.chooser.reads_sequences else
                   (options.do_sample, repr(sorted(options.generate_kwargs.items()))))
            groups.setdefault(key, []).append(r)
        out = torch.empty(len(order), dtype=torch.long, device=logits.device)
        for members in groups.values():
            chooser, index = order[members[0]].chooser, torch.tensor(members, device=logits.device)
            rows = logits[:len(order)].index_select(0, index)
            if chooser.reads_sequences:
                lane = order[members[0]]
                made = torch.tensor(lane.tokens, dtype=torch.long, device=logits.device)
                sequences = torch.cat([lane.row.input_ids, made])[None]
            else:
                sequences = torch.zeros(len(members), 1, dtype=torch.long, device=logits.device)
            running = torch.ones(len(members), dtype=torch.long, device=logits.device)
            out.index_copy_(0, index, chooser.choose(sequences, rows, running)[0])
        return out

    # -- release -----------------------------------------------------------------------

    def release(self, lane: Lane, reason: str = "released") -> None:
        """End ``lane`` (its ``finish`` is ``reason`` unless it ended already): store the
        spans its tail computed, free its slots and the regions no lane sees any more."""
        if lane not in self.lanes:
            return
        lane.finish = lane.finish or reason
        if lane.fed:
            cache = kvops.as_cache(SpanKV(*self.executor.buffers.views(self.pool.high)))
            self._store(lane.call, cache, lane.own - lane.row.start)
        owners, bit = self.executor.owners, self._bit(lane.index)
        owners[lane.own:self.pool.give(lane.own)].fill_(OWNER_FREE)
        for key in lane.chains:
            region = self._regions[key]
            region.users &= ~bit
            owners[region.start:region.start + region.piece.num_tokens].bitwise_and_(~bit)
            if not region.users:
                del self._regions[key]
                self.pool.give(region.start)
        self.lanes.remove(lane)
