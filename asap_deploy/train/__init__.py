"""Training: discriminator, losses, the training loop and data-parallel runs."""
