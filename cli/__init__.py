"""The `compress` command line: a thin click layer over the `compressor` library."""
