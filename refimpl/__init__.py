"""refimpl: the book's plain PyTorch reference, the ground truth every kernel is checked against."""
