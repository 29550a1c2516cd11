"""GPU side of dormant-heads: model loading, attention capture, head scores, ablation, datasets."""
