"""Ingest: what the node receives and when a series is ready to read.

``spool`` makes each instance durable before the listener answers Success and
owns instance identity; ``assemble`` decides when a series is complete and
whether it is read; ``listener`` is the pynetdicom C-ECHO/C-STORE SCP and ``guard``
bounds what hostile or broken peers can make it do.
"""
