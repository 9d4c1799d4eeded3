"""Loss functions, one module per network family (pure functions of tensors)."""
