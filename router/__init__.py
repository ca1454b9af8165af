"""The live driver: OpenAI-compatible front door, forwarding, discovery, shared state."""
