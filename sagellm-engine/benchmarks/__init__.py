"""asv benchmarks of sagellm.engine (tiny model always, embedded model when installed)."""
