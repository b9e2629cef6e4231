"""The gRPC layer: servicers, middleware, and conversions between protobuf and domain types."""
