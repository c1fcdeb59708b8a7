"""refham as a test oracle: golden files of reference tensors (`golden`), comparing a
candidate implementation with them (`check`), and weights in and out with timm's names
(`interop`)."""
