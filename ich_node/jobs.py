"""Moved to :mod:`ich_node.queue.jobs`; this name stays for code written before the move."""

from ich_node.queue.jobs import *  # noqa: F403
