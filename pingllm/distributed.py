"""Process start-up: one program per host, joined into one JAX job."""

from __future__ import annotations

import os

import jax
from absl import logging

from pingllm import preemption


def _on_multihost_tpu_vm() -> bool:
    """Cloud TPU VM slices with more than one worker list their hosts in the environment."""
    hosts = os.environ.get("TPU_WORKER_HOSTNAMES", "")
    return "," in hosts or bool(os.environ.get("MEGASCALE_COORDINATOR_ADDRESS"))


def initialize(
    coordinator_address: str | None = None,
    num_processes: int | None = None,
    process_id: int | None = None,
) -> None:
    """Joins the job: explicit coordinator flags, TPU-VM auto-detection, or a lone process.

    On CPU the cross-process collectives are gloo's. Must run before any other
    JAX call that touches devices.
    """
    platforms = os.environ.get("JAX_PLATFORMS", "")
    if coordinator_address or (num_processes or 1) > 1:
        if not (coordinator_address and num_processes and process_id is not None):
            raise ValueError(
                "--coordinator_address, --num_processes and --process_id must be given together"
            )
        # JAX's preemption service would swallow SIGTERM; preemption.StopSignal owns it.
        preemption.disable_jax_preemption_service()
        if platforms in ("", "cpu"):
            jax.config.update("jax_cpu_collectives_implementation", "gloo")
        jax.distributed.initialize(
            coordinator_address=coordinator_address,
            num_processes=num_processes,
            process_id=process_id,
        )
    elif _on_multihost_tpu_vm():
        preemption.disable_jax_preemption_service()
        jax.distributed.initialize()
    logging.info(
        "process %d of %d, %d local / %d global devices (%s)",
        jax.process_index(), jax.process_count(), jax.local_device_count(),
        jax.device_count(), jax.devices()[0].device_kind,
    )
