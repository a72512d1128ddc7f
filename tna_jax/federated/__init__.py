"""Federated learning with TNA-PFN: FedAvg, FedProx, FedPFN, FedPNU, FedAdam under non-IID splits.

partition: clients' shares of the training set (IID, Dirichlet label skew, k-class shards).
client: local training of every sampled client of a round as one compiled program.
algorithms: the algorithms as pure (init, round) functions over a typed server state; the
server step is an optax transformation (FedAvg/FedAvgM: SGD, FedAdam: Adam, FedYogi: Yogi).
"""
