"""Training of adapters (LoRA, routers); may use samplers/ and caching/."""
