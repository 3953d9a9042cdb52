"""Measurements in, token batches out: schema, tokens, sources and the pipeline."""
