"""Federated learning with TNA-PFN: FedAvg, FedProx, FedPFN, FedPNU under non-IID splits.

partition: clients' shares of the training set (IID, Dirichlet label skew, k-class shards).
client: local training of every sampled client of a round as one compiled program.
algorithms: the algorithms as pure (init, round) functions over a server state.
"""
