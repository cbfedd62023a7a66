"""livemesh shared core: wire protocol, topics, config, KV backends, sans-IO state machines."""

__version__ = "0.1.0"
