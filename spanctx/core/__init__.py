"""The core layer: prompt values and rules, no torch (see the package layout in docs)."""
