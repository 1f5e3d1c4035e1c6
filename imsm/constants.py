"""Constants shared by the data and model layers, so that neither imports the other."""

IGNORE_INDEX = -100  # the label of prompt and pad tokens: PyTorch's cross-entropy skips it
