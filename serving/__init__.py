"""Server-side plumbing shared by the encoder and generator: torch tensors on the
wire, process start-up, health, error mapping. Needs torch; the client does not."""
