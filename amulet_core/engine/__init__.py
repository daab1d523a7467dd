"""The inference engine: one worker that owns the model, batches requests and reuses KV."""
