"""Moved to :mod:`ich_node.queue.store`; this name stays for code written before the move."""

from ich_node.queue.store import *  # noqa: F403
