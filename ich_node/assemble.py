"""Moved to :mod:`ich_node.ingest.assemble`; this name stays for code written before the move."""

from ich_node.ingest.assemble import *  # noqa: F403
