"""Checkpoints on local disk or gs://: format (layout, completeness, integrity), manager (the
train loop's tiers), inspect and reshard. Importing it fixes the gs:// client (see storage)."""

from pingllm.checkpoint import storage  # noqa: F401 - sets epath's gs:// backend before any use
