"""pingllm: a JAX trainer for network latency models."""
