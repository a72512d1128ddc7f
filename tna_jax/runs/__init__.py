"""The life of a run on disk: the runtime (workdir lock, resumable phases, checkpoints,
metrics, timed sections, results written last), workdir states, verified orbax checkpoints,
metrics.jsonl and TensorBoard, results and plots, the --dry_run plan, and `load_run`."""
