"""Backends: dialling a station's CSMS link, duplication to secondaries, the outbox."""
