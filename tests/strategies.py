"""Hypothesis strategies shared by the tests (keep them all here)."""

from __future__ import annotations

from hypothesis import strategies as st

# -- chat (issue 5): random conversations ---------------------------------------------------

ROLES = ("system", "user", "assistant", "tool")
# printable text, newlines, non-ASCII letters and the ChatML markers themselves
MESSAGE_TEXT = st.text(
    st.one_of(st.characters(codec="utf-8", exclude_categories=("Cs", "Cc")), st.sampled_from("\n\t")),
    max_size=24,
) | st.sampled_from(["<|im_start|>", "<|im_end|>\n", "assistant\n", ""])


def chat_messages(max_messages: int = 6):
    """A list of message dicts with random roles and contents (roles need not alternate)."""
    message = st.fixed_dictionaries({"role": st.sampled_from(ROLES), "content": MESSAGE_TEXT})
    return st.lists(message, min_size=1, max_size=max_messages)
