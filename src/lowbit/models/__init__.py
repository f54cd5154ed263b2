"""Per-architecture facts as data, the safetensors reader and meta-device loading, MoE and Conv1D adapters."""
