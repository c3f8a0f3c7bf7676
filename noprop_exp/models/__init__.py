"""Networks: image backbones (paper CNN, ResNets), the NoProp-DT block and the CT/FM network."""
