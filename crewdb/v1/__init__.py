"""Generated protobuf and gRPC code for the crewdb.v1 API; produced by `make proto`, never edited."""
