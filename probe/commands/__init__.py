"""The commands: `capture` (watch for a while and print), `check` (what this
machine offers) and `run` (the host daemon)."""
