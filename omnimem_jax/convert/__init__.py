"""PyTorch-world checkpoints -> OmniMem-JAX parameters and Orbax checkpoints.

`state_dict` reads files and does the steps every model shares; one module per model family holds
its name map (`wan_dit` for the DiT).
"""
