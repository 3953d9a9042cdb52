"""One process of a real multi-process data job: jax.distributed over gloo, then dump this
process's rows of some steps to an npz (used by tests/test_pipeline.py).

usage: pipeline_worker.py PORT PROCESS_ID NUM_PROCESSES OUT.npz STEP[,STEP...] JSON_CONFIG
"""

import json
import os
import sys

os.environ.setdefault("JAX_PLATFORMS", "cpu")
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def main():
    port, process_id, num_processes, out, steps, config_json = sys.argv[1:7]
    import jax

    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(f"127.0.0.1:{port}", num_processes=int(num_processes),
                               process_id=int(process_id))
    import numpy as np

    from pingllm.cli import dump_batches
    from pingllm.data import pipeline

    config = pipeline.DataConfig(**json.loads(config_json))
    rows = dump_batches.dump(config, [int(s) for s in steps.split(",")],
                             jax.process_index(), jax.process_count())
    np.savez(out, **rows)
    # Everyone finishes together: a process that leaves early makes the others abort.
    from jax.experimental import multihost_utils

    multihost_utils.sync_global_devices("pipeline_worker:done")
    jax.distributed.shutdown()


if __name__ == "__main__":
    main()
