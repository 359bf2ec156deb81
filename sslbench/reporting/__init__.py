"""Tables and plots rebuilt from a run's files alone (eval.json, metrics.jsonl): never imports training,
evaluation or methods."""
