"""Decoding: samplers (`sampling`), one-jit generation (`generate`), plain or speculative with a
drafter (`Drafter`: `DraftModel` in `speculative_generate`, `DFlash` in `dflash`; the modules
keep their `speculative_generate` / `dflash_generate` wrappers)."""

from effjax.decode.generate import Drafter, GenerateOutput, generate, prompt_bucket, trace_count
from effjax.decode.sampling import (GREEDY, Sampler, greedy, processed_logits, processed_probs,
                                    sample, sample_temperature, sample_top_k, sample_top_p)
from effjax.decode.dflash import DFlash
from effjax.decode.speculative_generate import DraftModel

__all__ = [
    "DFlash", "DraftModel", "Drafter", "GREEDY", "GenerateOutput", "Sampler", "generate", "greedy",
    "processed_logits", "processed_probs", "prompt_bucket", "sample", "sample_temperature",
    "sample_top_k", "sample_top_p", "trace_count",
]
