"""The probe's benchmark: what tracing costs, measured side by side (`make bench`)."""
