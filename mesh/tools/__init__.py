"""Operator and test tools (meshctl, the load generator, the topology launcher, the Consul
agent runner, an SSE client). No node process imports this package."""
