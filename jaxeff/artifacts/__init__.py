"""What a run leaves behind and how it is read back: checkpoints (checkpoint.py), exports (export.py), and one
loader for both (load.py). Task-agnostic: a task's model is built through its model contract (jaxeff.tasks)."""
