"""crewdb: a typed gRPC data service for AI-agent applications."""

__version__ = "0.1.0"
