"""The model stage (design stages 6 infer and 7 explain), run only in worker processes.

:mod:`.bundle` loads and verifies a model bundle (its card is the torch-free
shared record :mod:`ich_node.card`), :mod:`.networks` holds the classifier and
the sequence stage, :mod:`.inference` runs them on a series and
:mod:`.explain` makes the Grad-CAM maps. This package imports torch; the
serving process and :mod:`ich_node.results` never import it (tests/test_layout.py).
Nothing is imported here, so ``import ich_node.model.bundle`` loads only what it needs.
"""
