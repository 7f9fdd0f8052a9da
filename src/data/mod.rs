//! Data: tokenizers, token shards, loader.
