"""Data: LLaVA-style records, WebDataset shards with an energon index, and reading them back."""
