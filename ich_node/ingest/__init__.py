"""Ingest: what the node receives and when a series is ready to read.

``spool`` makes each instance durable before the listener answers Success and
owns instance identity; ``assemble`` decides when a series is complete and
whether it is read. The listener (``ich_node.listener``) is still at the top of
the package.
"""
