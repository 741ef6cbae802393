"""The ``ocpp-router`` command line: the node's commands (:mod:`router.cli.main`), admin
views, policy tools and the demo. Nothing is imported here, so each module also runs
alone with ``python -m``."""
