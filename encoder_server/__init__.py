"""The encoder service: Qwen2-VL, connector, T5 and CLIP behind gRPC (GPU 0)."""
