"""PDS: the PMP data-weight solver and the data scorer."""
