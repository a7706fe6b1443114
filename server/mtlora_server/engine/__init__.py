"""The serving engine: loads a base model once, serves many adapters in one batch. See `types.EngineClient`."""
