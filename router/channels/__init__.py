"""Binary channels over the overlay: TCP tunnels between nodes (router/channels/service.py),
under credit-based flow control (router/channels/flow.py)."""
