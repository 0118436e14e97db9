"""The target of a worker process, importable without the worker module.

``multiprocessing`` (spawn) pickles the target by reference, so the serving
process imports the target's module. This one imports :mod:`ich_node.service.worker`
only inside the child: the process that accepts images never loads the worker
module (nor, through it, the model code).
"""

from __future__ import annotations

from typing import Final

from ich_node.config import NodeConfig

#: Exit code of a worker whose ``model.device`` cannot be used (``cuda`` without
#: CUDA, the model not fitting on it): restarting it cannot help, ``serve`` exits 2.
WORKER_EXIT_BAD_DEVICE: Final = 4


def worker_process(config: NodeConfig, name: str, parent: int | None = None) -> None:
    """Run a worker in this (child) process; exits with the worker's code."""
    from ich_node.service.worker import _process_entry

    _process_entry(config, name, parent)
