"""The tape format: layout, metadata, schema, records, delta prompts, reader, writer, storage,
compaction and inspect. This wing imports nothing else of gymtape (but ``recorder._errors``);
the other wings build on it. Its public names are exported by ``recorder``."""
