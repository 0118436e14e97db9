"""Moved to :mod:`ich_node.ingest.spool`; this name stays for code written before the move."""

from ich_node.ingest.spool import *  # noqa: F403
