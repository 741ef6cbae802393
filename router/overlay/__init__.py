"""The overlay: peer links, route exchange, forwarding by destination, station attach."""
