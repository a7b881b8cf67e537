"""torch.library registrations of the hnsample ops (one module per op)."""
