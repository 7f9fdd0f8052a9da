//! Data: tokenizers, llm.c-format token shards, and the deterministic batch loader.
//!
//! The pipeline, from text to batches:
//!
//! 1. [`prepare()`] reads text files, tokenizes them with a [`Tokenizer`] and writes a
//!    validation shard and a training shard (the `taproot data prepare` command).
//!    It records the tokenizer beside the shards ([`record`], `corpus.json`) and refuses to mix
//!    a second corpus into a folder.
//! 2. [`Dataset::open`] opens a directory of shards (u16 or u32 tokens), checking every token
//!    against the model's vocabulary; [`Dataset::open_config`] opens a run's `[data]` (one
//!    folder or a weighted mixture) and checks the recorded tokenizer.
//! 3. [`Loader`] draws random `B x (T + 1)` training batches whose sequence is fixed by a seed
//!    and resumable from a [`LoaderState`]; [`sequential_batches`] walks the validation set
//!    in order for evaluation.
//!
//! Shards use llm.c's `.bin` format (see [`shard`]) so data can be shared with llm.c.

pub mod bpe;
pub mod hf_tokenizer;
pub mod input;
pub mod loader;
pub mod prepare;
pub mod record;
pub mod shard;
pub mod synthetic;
pub mod tokenizer;
pub mod tokens;

pub use loader::{num_sequential_batches, sequential_batches, Dataset, Loader, LoaderState, SequentialBatches, Source};
pub use prepare::{prepare, PrepareArgs, PrepareReport};
pub use record::CorpusRecord;
pub use shard::{
    check_tokens, open_shard, read_shard, write_shard, write_shard_as, ShardWriter, Width, HEADER_BYTES, SHARD_MAGIC, SHARD_VERSION,
    SHARD_VERSION_U32,
};
pub use tokenizer::{Tokenizer, GPT2_EOT, GPT2_VOCAB, TOKENIZER_NAMES};
pub use tokens::Tokens;
