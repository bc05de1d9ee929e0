"""Kernel stage: loading and attaching the BPF programs, feature detection,
and decoding the events they send into the dataclasses of `events`."""
