"""The service stage: the processes and the commands around the pipeline.

:mod:`.serve` runs the serving process (listener, assembler, sender, retention,
worker supervision) by role; :mod:`.spawn` starts worker processes and
:mod:`.worker` is their pipeline (lease and read, model, results); :mod:`.ops`
answers ``status``, ``health`` and ``resend``; :mod:`.cli` is the ``ich-node``
command. Nothing is imported here: the serving process must not load the
worker (and with it torch) by importing this package.
"""
