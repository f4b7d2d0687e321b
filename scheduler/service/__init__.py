"""The scheduler's edges: gRPC servicers, conversions, the placement coordinator."""
