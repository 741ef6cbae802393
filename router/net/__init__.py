"""WebSocket links and handshakes on trio, TLS contexts, and DNS (SRV and addresses)."""
