"""Command-line tools: weight conversion, export, shard making, benchmarks."""
