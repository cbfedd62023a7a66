"""The wire format: frames, protocol constants, event rows (docs/PROTOCOL.md)."""
