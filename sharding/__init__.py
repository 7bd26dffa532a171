"""`ptrain shard` and its parts: sources (annotations) -> plan -> decode -> write, run on Ray by job."""
