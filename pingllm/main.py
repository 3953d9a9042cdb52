"""pingllm's entry point: `python -m pingllm.main --gin_file=gin/latency_network.gin`.

Exit status: 0 when the run reached its last step (also when a rerun finds it
already there), 75 (EX_TEMPFAIL) when it stopped early on SIGTERM, SIGINT or its
time limit after saving a checkpoint (run the same command to resume),
2 for a config error, 1 for any other error.
"""

from __future__ import annotations

import sys

from absl import app, flags, logging

FLAGS = flags.DEFINE_multi_string("gin_file", [], "Gin config file (repeatable; later wins).")
BINDINGS = flags.DEFINE_multi_string("gin_bindings", [],
                                     "Gin binding, e.g. 'STEPS=10' (repeatable).")
SEARCH = flags.DEFINE_multi_string("gin_search_paths", [], "Extra directories for gin includes.")
COORDINATOR = flags.DEFINE_string("coordinator_address", None, "host:port of process 0.")
NUM_PROCESSES = flags.DEFINE_integer("num_processes", None, "Processes in the job.")
PROCESS_ID = flags.DEFINE_integer("process_id", None, "This process's index in the job.")

EXIT_CONFIG_ERROR = 2


def main(argv) -> int:
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    # Config first: a bad file or binding fails before any device or network work.
    from pingllm import config as config_lib

    try:
        cfg = config_lib.load(FLAGS.value, BINDINGS.value, SEARCH.value)
    except config_lib.ConfigError as e:
        print(f"pingllm: config error: {e}", file=sys.stderr)
        return EXIT_CONFIG_ERROR

    # A bucket that does not exist, or no credentials, fails here within seconds, naming the
    # path, before any device work (and never falls back to a local directory).
    from pingllm.checkpoint import storage

    paths = (cfg.run.run_dir, cfg.checkpoint.load_full_state_path,
             cfg.checkpoint.load_parameters_path)
    for path in filter(None, paths):
        try:
            storage.check_writable(path)
        except storage.StorageError as e:
            print(f"pingllm: storage error: {e}", file=sys.stderr)
            return EXIT_CONFIG_ERROR

    from pingllm import distributed, trainer

    distributed.initialize(COORDINATOR.value, NUM_PROCESSES.value, PROCESS_ID.value)
    return trainer.train(cfg)


def run() -> None:
    """The `pingllm-train` console script (same as `python -m pingllm.main`)."""
    logging.set_verbosity(logging.INFO)
    app.run(main)


if __name__ == "__main__":
    run()
