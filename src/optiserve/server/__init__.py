"""The server: the management REST API (models, jobs, benchmarks, keys) — `optiserve serve`."""
