"""Sans-IO overlay topology: node ids, the route table and the route-exchange protocol.

Filled in by the overlay work; it imports neither trio nor sockets.
"""
