"""The gRPC boundary: the only package that imports grpc or the generated stubs."""
