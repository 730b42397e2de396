"""Training and evaluation tools: the data world, the VAE, the Fashion-MNIST classifier and the shapes detector."""
