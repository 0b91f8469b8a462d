"""Hand-written kernels called through the XLA FFI (see each module)."""
