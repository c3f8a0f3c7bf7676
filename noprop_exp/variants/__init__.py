"""The methods: NoProp-DT, -CT, -FM and the back-propagation and adjoint baselines."""
