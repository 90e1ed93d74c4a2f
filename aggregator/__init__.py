"""The coordinator: Flower ServerApp (FedAvg, FedProx or FedAdam inside SecAgg+), central DP, run records."""
