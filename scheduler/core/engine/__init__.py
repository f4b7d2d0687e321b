"""The placement engine: framework, plugins, fast path and CP-SAT batches."""
