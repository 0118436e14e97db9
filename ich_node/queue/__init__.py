"""The node's durable state: storage layout (paths), store interfaces, the job queue.

``layout`` is the one owner of the paths under ``storage.dir``; ``interface``
holds the narrow typed interfaces of the store (instances and series, jobs,
deliveries) that the stages depend on; ``store`` and ``jobs`` are the SQLite
implementation.
"""
