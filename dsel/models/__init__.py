"""Model definitions: the GPT decoder and the PDS data scorer."""
