"""The compiled computation: data held on the device, models, TNA-PFN masks and the freeze
transform, the optimizer, K models trained in one compiled epoch, evaluation, the mesh and
the execution policy derived from it, and the FLOP and communication analysis of compiled
programs. Nothing here reads or writes a workdir."""
