"""Export stage: sends finished spans somewhere (console, JSON lines, OTLP),
each exporter behind the small `SpanExporter` interface."""
