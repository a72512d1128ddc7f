"""tna_jax: training-time neuron alignment (TNA-PFN), linear mode connectivity and fusion."""

__version__ = "0.1.0"
