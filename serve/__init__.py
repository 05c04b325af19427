"""`toolkit serve`: a small, hardened HTTP server speaking the Open Inference Protocol (KServe v2)."""
