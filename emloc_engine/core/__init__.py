"""The torch-free core: errors, progress, atomic writes, paths, the run-folder layout, architectures, version."""
