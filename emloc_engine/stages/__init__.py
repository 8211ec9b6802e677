"""The four stages of a run, each a frozen config -> function(config, progress) -> frozen result."""
