"""Reports of the experiments: markdown tables (`report`) and matplotlib figures (`plots`)."""
