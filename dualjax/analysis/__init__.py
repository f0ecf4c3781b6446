"""Analysis of a sweep: GP map of the optimal lambda, the paper's figures, a Markdown summary."""
