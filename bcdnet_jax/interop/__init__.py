"""PyTorch interoperability (torch is needed only here, the `torch` extra).

    convert     a released checkpoint (state dict) -> model directory, one name table per
                family, with a self-check against the torch reference (`bcdnet-convert`)
    torch_ref   a PyTorch reference of the released layouts, for that self-check and tests
"""
