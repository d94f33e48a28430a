"""PyTorch interoperability (torch is needed only here, the `torch` extra).

    convert     a released checkpoint (state dict) -> model directory, one name table per
                family, with a self-check against the torch reference (`bcdnet-convert`)
    torch_file  reading a torch checkpoint file safely: zip CRC-32s, weights_only, the
                state dict in any of the usual layouts (re-exported by convert)
    torch_ref   a PyTorch reference of the released layouts, for that self-check and tests
"""
