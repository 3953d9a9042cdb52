"""Command-line entry points, one module per command (registered as pingllm-* scripts)."""
