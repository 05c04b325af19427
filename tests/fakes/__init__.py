"""Stand-ins for what a test cannot or should not use for real: runners, libraries (TensorRT), hostile
files."""
