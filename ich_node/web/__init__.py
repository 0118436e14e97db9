"""The web console (``ich-node web``): a process of its own beside ``serve``.

It reads the node's store and the folders under ``storage.dir`` and shows them
(Overview, Series, Problems, Validation); its one write is a resend, through
:func:`ich_node.service.ops.requeue_parked`. It never talks to the listener or
the workers and never imports the model, torch or the listener: a crash or a
slow page cannot stop the node. See docs/web.md.
"""
