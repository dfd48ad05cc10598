"""Features built on the session: batches, checks, scoring, states, structured output,
tools, async calls, reward models, fidelity."""
