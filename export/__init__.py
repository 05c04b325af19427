"""Writers of artifacts. Each format module offers `export(...) -> Path`; `pipeline.run_export` chains
checkpoint -> model + card -> export -> verify -> move into place, for every format in its table."""
