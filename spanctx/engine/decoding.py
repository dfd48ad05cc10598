"""Token choice for a hand-written decode loop, with Hugging Face ``generate``'s semantics.

``TokenChooser.from_options`` reads a call's ``CallOptions`` the way ``generate`` would:
the model's ``generation_config``, under transformers' global defaults for unset fields
(``top_k`` 50, ``temperature``/``top_p``/``typical_p``/``repetition_penalty`` 1), under
the call's kwargs. It builds the same processors in the same order as ``generate``:
repetition penalty, the caller's ``logits_processor``, then with sampling temperature,
top-k, top-p, min-p and typical-p. A row that produced an EOS token is finished and
gets ``pad_token_id`` from then on; the caller's ``stopping_criteria`` finish rows too.

What it does not build (beams, several sequences per prompt, stop strings, other
processors a generation config may switch on) is named by ``unsupported_options``: the
engine runs such calls on the eager executor.

``HostMirror`` brings a step's tokens and the "any row still running" flag to the host
through pinned memory and an event, so the loop can launch the next step before it
waits for them.
"""

from __future__ import annotations

import contextlib
import copy
from collections.abc import Iterator, Sequence

import attrs
import torch
from transformers import (
    LogitsProcessorList,
    MinNewTokensLengthLogitsProcessor,
    MinPLogitsWarper,
    RepetitionPenaltyLogitsProcessor,
    StoppingCriteriaList,
    TemperatureLogitsWarper,
    TopKLogitsWarper,
    TopPLogitsWarper,
    TypicalLogitsWarper,
)

from ..core.options import CallOptions

__all__ = ["SUPPORTED_KWARGS", "HostMirror", "TokenChooser", "unsupported_options"]

# generate kwargs this module understands (besides max_new_tokens, do_sample and seed)
SUPPORTED_KWARGS = frozenset({"temperature", "top_k", "top_p", "min_p", "typical_p", "repetition_penalty",
                              "pad_token_id", "eos_token_id", "logits_processor", "stopping_criteria",
                              "min_new_tokens"})
_LOGITS_ONLY = (TemperatureLogitsWarper, TopKLogitsWarper, TopPLogitsWarper, MinPLogitsWarper, TypicalLogitsWarper)
_UNSET_DEFAULTS = {"temperature": 1.0, "top_k": 50, "top_p": 1.0, "typical_p": 1.0, "repetition_penalty": 1.0}
# generation-config fields whose behaviour is not built here, with the values that mean "off"
_OFF_VALUES = {
    "num_beams": (None, 1), "num_return_sequences": (None, 1), "no_repeat_ngram_size": (None, 0),
    "bad_words_ids": (None,), "suppress_tokens": (None,), "begin_suppress_tokens": (None,),
    "forced_bos_token_id": (None,), "forced_eos_token_id": (None,), "min_length": (None, 0),
    "sequence_bias": (None,), "guidance_scale": (None, 1, 1.0),
    "exponential_decay_length_penalty": (None,), "epsilon_cutoff": (None, 0, 0.0), "eta_cutoff": (None, 0, 0.0),
    "renormalize_logits": (None, False), "remove_invalid_values": (None, False), "stop_strings": (None,),
    "max_time": (None,), "watermarking_config": (None,), "top_h": (None,), "penalty_alpha": (None,),
    "dola_layers": (None,), "output_scores": (None, False), "output_logits": (None, False),
    "return_dict_in_generate": (None, False),
}


def _generation_config(model, options: CallOptions):
    """The model's generation config with the call's kwargs applied (processor and
    criteria lists are not config fields; they stay out)."""
    config = copy.copy(model.generation_config)  # update() rebinds fields, never mutates them: no deep copy
    fields = {k: v for k, v in options.generate_kwargs.items() if k not in ("logits_processor", "stopping_criteria")}
    config.update(**fields, do_sample=options.do_sample)
    return config


def unsupported_options(model, options: CallOptions) -> str | None:
    """Why the options cannot run here (None when they can)."""
    unknown = sorted(set(options.generate_kwargs) - SUPPORTED_KWARGS)
    if unknown:
        return f"generate kwargs {unknown} are not supported by the static executor's decode loop"
    config = _generation_config(model, options)
    active = sorted(f for f, off in _OFF_VALUES.items() if getattr(config, f, None) not in off)
    if active:
        return f"the generation config switches on {active}, which the static executor's decode loop does not build"
    return None


def _eos_ids(eos: int | Sequence[int] | torch.Tensor | None) -> list[int]:
    if eos is None:
        return []
    if isinstance(eos, torch.Tensor):
        return eos.reshape(-1).tolist()
    return [eos] if isinstance(eos, int) else list(eos)


@attrs.frozen(eq=False)
class TokenChooser:
    """Picks each row's next token from the last logits, and says which rows finished."""

    processors: LogitsProcessorList
    criteria: StoppingCriteriaList  # the caller's; EOS is handled by ``eos``
    do_sample: bool
    eos: torch.Tensor | None  # [E] on the device, None without EOS
    pad_token_id: int | None
    eos_ids: frozenset[int] = frozenset()  # the same, on the host

    @property
    def reads_sequences(self) -> bool:
        """Whether a row's choice depends on its tokens so far (repetition penalty, a
        minimum length, the caller's processors or criteria), not on its logits alone."""
        return bool(self.criteria) or any(not isinstance(p, _LOGITS_ONLY) for p in self.processors)

    @classmethod
    def from_options(cls, model, options: CallOptions, device: torch.device, prompt_length: int) -> TokenChooser:
        reason = unsupported_options(model, options)
        if reason is not None:
            raise ValueError(reason)
        config = _generation_config(model, options)

        def value(name):
            set_value = getattr(config, name, None)
            return _UNSET_DEFAULTS.get(name) if set_value is None else set_value

        eos = _eos_ids(config.eos_token_id)
        processors = LogitsProcessorList()
        if (config.min_new_tokens or 0) > 0 and eos:  # EOS is masked until that many tokens are out
            processors.append(MinNewTokensLengthLogitsProcessor(prompt_length, config.min_new_tokens, eos,
                                                                device=device))
        if value("repetition_penalty") != 1.0:
            processors.append(RepetitionPenaltyLogitsProcessor(penalty=value("repetition_penalty")))
        processors.extend(options.generate_kwargs.get("logits_processor") or [])
        if options.do_sample:
            if value("temperature") != 1.0:
                processors.append(TemperatureLogitsWarper(value("temperature")))
            if value("top_k") != 0:
                processors.append(TopKLogitsWarper(top_k=value("top_k")))
            if value("top_p") < 1.0:
                processors.append(TopPLogitsWarper(top_p=value("top_p")))
            if value("min_p") is not None:
                processors.append(MinPLogitsWarper(min_p=value("min_p")))
            if value("typical_p") < 1.0:
                processors.append(TypicalLogitsWarper(mass=value("typical_p")))
        pad = config.pad_token_id if config.pad_token_id is not None else (eos[0] if eos else None)
        return cls(processors, StoppingCriteriaList(options.generate_kwargs.get("stopping_criteria") or []),
                   options.do_sample, torch.tensor(eos, device=device) if eos else None, pad, frozenset(eos))

    def choose(self, sequences: torch.Tensor, logits: torch.Tensor,
               unfinished: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Next tokens ``[B]`` from ``logits [B, V]`` after ``sequences [B, n]``, and the
        processed scores ``[B, V]``; finished rows (``unfinished`` is 0) get the pad token."""
        scores = self.processors(sequences, logits.float())
        if self.do_sample:
            tokens = torch.multinomial(torch.softmax(scores, dim=-1), num_samples=1).squeeze(1)
        else:
            tokens = torch.argmax(scores, dim=-1)
        if self.eos is not None:
            tokens = tokens * unfinished + self.pad_token_id * (1 - unfinished)
        return tokens, scores

    def still_running(self, sequences: torch.Tensor, scores: torch.Tensor, unfinished: torch.Tensor) -> torch.Tensor:
        """``unfinished [B]`` (int64) once the last token of ``sequences`` was chosen from ``scores``."""
        if self.eos is not None:
            unfinished = unfinished & ~torch.isin(sequences[:, -1], self.eos)
        if self.criteria:
            unfinished = unfinished & ~self.criteria(sequences, scores)
        return unfinished


class HostMirror:
    """Brings a step's tokens and the "any row still running" flag to the host without
    waiting for work queued after them (pinned buffers and an event on CUDA)."""

    def __init__(self, batch: int, device: torch.device) -> None:
        pinned = device.type == "cuda"
        self._tokens = torch.zeros(batch, dtype=torch.long, pin_memory=pinned)
        self._running = torch.zeros(1, dtype=torch.bool, pin_memory=pinned)
        self._event = torch.cuda.Event() if pinned else None

    def send(self, tokens: torch.Tensor, unfinished: torch.Tensor) -> None:
        self._tokens.copy_(tokens, non_blocking=True)
        self._running.copy_(unfinished.any()[None], non_blocking=True)
        if self._event is not None:
            self._event.record()

    def receive(self) -> tuple[torch.Tensor, bool]:
        if self._event is not None:
            self._event.synchronize()
        return self._tokens.clone(), bool(self._running)


@contextlib.contextmanager
def seeded(seed: int | None, device: torch.device) -> Iterator[None]:
    """Run the block on RNGs seeded with ``seed``, then restore the CPU RNG and, on CUDA,
    the device's. No-op when ``seed`` is None."""
    if seed is None:
        yield
        return
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        torch.manual_seed(seed)
        yield
