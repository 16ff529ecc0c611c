"""R2R small/large token routing: which of the small model's tokens the large model must rewrite."""
