"""Cache lifecycle: integrity check and quarantine (``check``), and sharing entries between
stores with their provenance (``transfer``: export / import).

Each is a function over a :class:`~notebook_flow.storage.ResultStore`; the ``notebook-flow``
subcommands that drive them are registered from ``notebook_flow/cli.py`` and live beside
them (``lifecycle/cli.py``). Nothing here is imported by ``import notebook_flow``.
"""
