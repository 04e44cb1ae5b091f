"""Benchmarks: ``loadlab bench …``, each printing ratios measured side by side with a verdict."""
