"""``python -m router`` runs the same command line as ``ocpp-router``."""

from router.cli.main import main

raise SystemExit(main())
