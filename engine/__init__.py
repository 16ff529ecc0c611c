import kernels  # noqa: F401  (sets OMP_WAIT_POLICY before torch loads; see kernels/__init__.py)
