"""The gRPC layer: servicers, interceptors, and conversions between protobuf and domain types."""
