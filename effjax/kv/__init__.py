"""KV caches behind one protocol (`effjax.kv.base`): dense reference first; compressed,
evicting and offloaded caches implement the same methods and plug into `effjax.decode.generate`."""

from effjax.kv.base import (CacheConfig, KVCache, as_cache_config, init_layer_caches,
                            update_and_attend)
from effjax.kv.dense import DenseCache
from effjax.kv.kivi import KIVICache
from effjax.kv.turboquant import TurboQuantCache, turboquant_cache_config

__all__ = ["CacheConfig", "DenseCache", "KIVICache", "KVCache", "TurboQuantCache",
           "as_cache_config", "init_layer_caches", "turboquant_cache_config", "update_and_attend"]
