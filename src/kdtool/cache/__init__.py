"""The sparse teacher-logit cache: run the teacher once, train many students without it.

Layout of a cache directory::

    manifest.json              settings, fingerprints, sizes, shard list ("complete": true when done)
    shard-00000.safetensors    examples [0, S): values [n, k], indices [n, k], log_normalizer [n],
    shard-00001.safetensors    counts [S] (response tokens per example), token_hash [S]
    ...

For every example of the data file (file order, so the trainer's ``index`` finds it) the cache
holds one row per *target* position (``labels[1:] != -100``, the trainer's shifted mask) in
position order: the teacher's top-k logits (sorted descending), their vocabulary ids, and the
full-vocabulary ``logsumexp`` (4 bytes, so true teacher probabilities stay known). Shards
cover fixed example ranges and are written atomically, so an interrupted build resumes at the
first missing shard and ends byte-identical to an uninterrupted one.

One job per module; imports run one way, top to bottom (``tests/test_cache_layout.py``):

    config.py        CacheConfig; the fingerprints a cache and a training run must share
    codec.py         stored dtypes: values (fp16, bf16, fp32, q8 codes), vocabulary ids; rows <-> tensors
    manifest.py      manifest.json: format name, atomic write, checked read
    teacher_pass.py  the teacher's top-k rows for a batch, and for one shard's examples
    build.py         build_cache: atomic shards, resume of an interrupted build, progress
    read.py          TeacherCache: open and check a finished cache, a batch's sparse teacher
"""

from kdtool.cache.build import build_cache
from kdtool.cache.codec import dequantize_q8, indices_to, quantize_q8
from kdtool.cache.config import CacheConfig, identity, token_hash, tokenizer_fingerprint
from kdtool.cache.manifest import FORMAT, MANIFEST, read_manifest
from kdtool.cache.read import TeacherCache
from kdtool.cache.teacher_pass import teacher_top_k

__all__ = [
    "FORMAT",
    "MANIFEST",
    "CacheConfig",
    "TeacherCache",
    "build_cache",
    "dequantize_q8",
    "identity",
    "indices_to",
    "quantize_q8",
    "read_manifest",
    "teacher_top_k",
    "token_hash",
    "tokenizer_fingerprint",
]
