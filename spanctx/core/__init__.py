"""The pure core: spans, messages, keys, plans, placement, chat rendering, options and the
prompt resolver. Imports nothing of spanctx beyond ``core`` and ``hf``, and no torch."""
