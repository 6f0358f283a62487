"""Reading kernels and checkpoints, writing matrices and models. No math lives here."""
