"""Developer tools: synthetic models and adapters for the demo, tests and benchmarks."""
