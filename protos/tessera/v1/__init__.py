"""Generated protobuf and gRPC code of the Tessera v1 wire contract."""
