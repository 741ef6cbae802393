"""The trio runtime of the OCPP overlay router: listener, links, forwarding, CLI."""

__version__ = "0.1.0"
