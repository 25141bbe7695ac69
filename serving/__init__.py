"""Everything that answers requests: model repository, TF Serving gRPC/REST API, batching, client."""
