"""Analysis side of dormant-heads: reads the score database; never imports torch."""
