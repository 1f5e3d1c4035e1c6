"""The siamese model: streams and mix (``siamese``), KV-cached decoding (``decoding``), gates, adapters."""
