"""The generator service: FLUX, ControlNet and VAE behind gRPC (GPU 1)."""
