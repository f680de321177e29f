"""Latency benchmarks: warmup, iterations, batch sizes -> p50/p95/p99 and throughput."""
