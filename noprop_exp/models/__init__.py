"""Networks: image backbones (paper CNN, ResNets), the NoProp-DT block (and its fused stack), the
CT/FM network and the linear head p(y | z)."""
