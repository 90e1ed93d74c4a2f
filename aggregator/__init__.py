"""Federated training with Flower: the ServerApp (FedAvg, later inside SecAgg+)."""
