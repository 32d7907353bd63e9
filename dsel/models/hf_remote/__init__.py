"""transformers modeling code shipped inside exports that need trust_remote_code (copied, not imported, by users)."""
