"""The ``loadlab`` command: the composition root, one module per command group."""
