"""Trace stage: turns HTTP exchanges into spans with OpenTelemetry semantic
convention attributes and per-process resources."""
