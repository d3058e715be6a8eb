"""
proxycache: a KV-cache-aware routing proxy in front of llama.cpp's llama-server.
"""

__version__ = "0.1.0"
