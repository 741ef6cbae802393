"""``python -m router`` runs the same command line as ``ocpp-router``."""

from router.cli import main

raise SystemExit(main())
