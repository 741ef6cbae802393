"""Codecs for what travels on links: OCPP-J frames and overlay frames (no I/O, no trio)."""
