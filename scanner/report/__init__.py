"""The evidence a person looks at: figures, the static HTML report, per-pair pictures."""
