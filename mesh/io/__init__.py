"""I/O adapters: ZeroMQ sockets on the loop, CURVE, peer links, process plumbing."""
